"""Chunked cross-entropy: equal to the full-logits loss (value and gradients), normalisation across
micro-batches, and a peak-memory check at the real 262k vocabulary."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from gemmalab.config import get_config
from gemmalab.model import Gemma3
from gemmalab.train.losses import chunked_cross_entropy, naive_cross_entropy

# fp32 tolerances: the chunked loss sums the same terms in another order (online logsumexp over
# vocabulary chunks, gradients accumulated over token chunks), so only rounding differs.
VALUE_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-5, atol=1e-5)
CHUNKS = dict(token_chunk=16, vocab_chunk=64)  # N = 111 and V = 301 are multiples of neither


def random_case(seed=0, N=111, V=301, d=24, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, N // 3, d, generator=g).to(dtype)
    weight = torch.randn(V, d, generator=g).to(dtype)
    targets = torch.randint(0, V, (3, N // 3), generator=g)
    targets[0, :5] = -100
    targets[2, -9:] = -100
    targets[1, 3] = V - 1  # the last row of the last, partial vocabulary chunk
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, **kw):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(hidden, weight, targets, **kw)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_matches_naive_loss_and_gradients(softcap):
    hidden, weight, targets = random_case()
    ours = loss_and_grads(chunked_cross_entropy, hidden, weight, targets, softcap=softcap, **CHUNKS)
    ref = loss_and_grads(naive_cross_entropy, hidden, weight, targets, softcap=softcap)
    torch.testing.assert_close(ours[0], ref[0], **VALUE_TOL)
    torch.testing.assert_close(ours[1], ref[1], **GRAD_TOL)
    torch.testing.assert_close(ours[2], ref[2], **GRAD_TOL)
    assert ours[1][0, :5].abs().max() == 0  # ignored tokens get no gradient
    # The naive reference itself is F.cross_entropy on full logits.
    logits = hidden.flatten(0, 1) @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    torch.testing.assert_close(ref[0], F.cross_entropy(logits, targets.flatten()), **VALUE_TOL)


def test_gradient_for_either_input_alone():
    hidden, weight, targets = random_case(seed=1)
    _, ref_h, ref_w = loss_and_grads(naive_cross_entropy, hidden, weight, targets)
    h = hidden.clone().requires_grad_()
    chunked_cross_entropy(h, weight, targets, **CHUNKS).backward()
    torch.testing.assert_close(h.grad, ref_h, **GRAD_TOL)
    w = weight.clone().requires_grad_()
    chunked_cross_entropy(hidden, w, targets, **CHUNKS).backward()
    torch.testing.assert_close(w.grad, ref_w, **GRAD_TOL)


def test_bf16_inputs_computed_in_fp32():
    hidden, weight, targets = random_case(seed=2, dtype=torch.bfloat16)
    loss, gh, gw = loss_and_grads(chunked_cross_entropy, hidden, weight, targets, **CHUNKS)
    ref = loss_and_grads(naive_cross_entropy, hidden.float(), weight.float(), targets)
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref[0], **VALUE_TOL)  # same bf16 values, fp32 arithmetic
    torch.testing.assert_close(gh.float(), ref[1], rtol=1e-2, atol=1e-4)  # one bf16 rounding
    torch.testing.assert_close(gw.float(), ref[2], rtol=1e-2, atol=1e-4)


def test_all_targets_ignored_gives_zero():
    hidden, weight, targets = random_case(seed=3)
    loss, gh, gw = loss_and_grads(chunked_cross_entropy, hidden, weight, torch.full_like(targets, -100))
    assert loss.item() == 0 and gh.abs().max() == 0 and gw.abs().max() == 0


def test_shape_mismatch_is_a_clear_error():
    hidden, weight, targets = random_case()
    with pytest.raises(ValueError, match="leading shape"):
        chunked_cross_entropy(hidden, weight, targets.flatten())


@pytest.mark.parametrize("name", ["tiny", "tiny-gemma2"])
def test_matches_model_logits_and_parameter_gradients(name):
    config = get_config(name)
    torch.manual_seed(0)
    model = Gemma3(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, 13), generator=g)
    targets = torch.randint(0, config.vocab_size, (2, 13), generator=g)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    # Tied embedding: its gradient comes from both the input lookup and the output head.
    ours = grads(chunked_cross_entropy(model.hidden_states(ids), model.embed_tokens.weight, targets,
                                       softcap=config.final_logit_softcapping,
                                       token_chunk=7, vocab_chunk=100))
    ref = grads(F.cross_entropy(model(ids).flatten(0, 1), targets.flatten()))
    torch.testing.assert_close(ours[0], ref[0], **VALUE_TOL)
    assert ours[1].keys() == ref[1].keys()
    for n in ref[1]:
        # Gradients back through the decoder: relative 1e-4, absolute 1e-5.
        torch.testing.assert_close(ours[1][n], ref[1][n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_micro_batches_with_global_normalizer_equal_one_batch(softcap):
    g = torch.Generator().manual_seed(4)
    V, d = 97, 16
    weight = torch.randn(V, d, generator=g)
    hidden = torch.randn(4, 10, d, generator=g)
    targets = torch.randint(0, V, (4, 10), generator=g)
    for i, n_ignored in enumerate([0, 3, 7, 9]):  # ragged: 10, 7, 3 and 1 targets
        targets[i, :n_ignored] = -100
    total = int((targets != -100).sum())

    whole = loss_and_grads(chunked_cross_entropy, hidden, weight, targets, softcap=softcap, **CHUNKS)
    w = weight.clone().requires_grad_()
    h = hidden.clone().requires_grad_()
    accumulated = 0.0
    for i in range(4):  # four micro-batches, gradients summed as in accumulation or all-reduce(sum)
        loss = chunked_cross_entropy(h[i], w, targets[i], softcap=softcap, normalizer=total, **CHUNKS)
        loss.backward()
        accumulated += loss.detach()
    torch.testing.assert_close(accumulated, whole[0], **VALUE_TOL)
    torch.testing.assert_close(h.grad, whole[1], **GRAD_TOL)
    torch.testing.assert_close(w.grad, whole[2], **GRAD_TOL)
    # A tensor normalizer works the same; the local default would weigh short micro-batches more.
    torch.testing.assert_close(
        chunked_cross_entropy(hidden[3], weight, targets[3], softcap=softcap, normalizer=torch.tensor(1.0)),
        chunked_cross_entropy(hidden[3], weight, targets[3], softcap=softcap), **VALUE_TOL)


MEMORY_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from gemmalab.train.losses import chunked_cross_entropy
    torch.set_num_threads(2)
    N, d, V = map(int, sys.argv[1:])

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, d, generator=g).requires_grad_()
    weight = torch.randn(V, d, generator=g).mul_(0.02).requires_grad_()  # in place: no temporary
    targets = torch.randint(0, V, (N,), generator=g)
    try:  # reset the high-water mark so the peak seen is that of the loss alone
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the inputs were built without temporaries, so the old peak is close to the current RSS
    base = rss("VmRSS:")
    t0 = time.perf_counter()
    loss = chunked_cross_entropy(hidden, weight, targets)
    loss.backward()
    seconds = time.perf_counter() - t0
    # VmHWM only: ru_maxrss survives exec (Linux keeps the parent's high-water mark in
    # signal->maxrss), so it reports the pytest process's peak, several GB after real-model tests.
    peak = rss("VmHWM:")
    assert torch.isfinite(loss) and weight.grad.shape == weight.shape
    print(peak - base, seconds)
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak RSS from /proc (Linux)")
@pytest.mark.parametrize("N,d", [(2048, 640), (8 * 2048, 64)])
def test_peak_memory_stays_far_below_full_logits(N, d):
    # The real 262k vocabulary with (a) the 270M's d = 640 on one 2048-token sequence and (b) the
    # acceptance batch of 8 x 2048 tokens with d = 64: forward + backward is 4 matmuls of
    # N x V x d, which at N = 16384 and d = 640 takes minutes on 2 CPU cores (measured once on a
    # 16-core machine: 1.06 GB extra peak). The chunked peak does not grow with N beyond the (N, d)
    # hidden gradient, while the full logits take N x V x 4 bytes (17.2 GB at 8 x 2048) and their
    # gradient as much again.
    V = 262144
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(N), str(d), str(V)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    extra, seconds = (float(x) for x in out.stdout.split())
    weight_grad = V * d * 4  # 671 MB: the (V, d) gradient itself, which any method must return
    naive = 2 * N * V * 4 + weight_grad  # logits + their gradient + weight gradient: 4.97 GB
    bound = weight_grad + 512 * 2**20  # + a few (1024 x 32768) fp32 chunk buffers (128 MB each)
    print(f"chunked CE N={N} d={d} V={V}: extra peak {extra / 1e9:.3f} GB in {seconds:.1f} s "
          f"(bound {bound / 1e9:.2f} GB, full logits >= {naive / 1e9:.2f} GB)")
    assert extra < bound, (extra, bound)
