"""The quantized CPU path: kernels against independent references, the fused decode step against the
module path, exactness of batched / speculative / row-wise decoding, and the modes on the real 270M.
"""
import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import gemmalab
from gemmalab.config import get_config
from gemmalab.generate import SamplingParams, generate_steps
from gemmalab.model import Gemma3
from gemmalab.quant import kernels
from gemmalab.quant.gguf_blocks import dequantize
from gemmalab.quant.linear import Q8_0, Q8_0_SYM, Q5_0_U8, QuantLinear, prepare_blocks
from gemmalab.quant.model import build_quantized

ops = kernels.ops()


def random_blocks(qtype, rows=48, cols=512, seed=0):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    q = gguf.quants.quantize(w, qtype)
    return torch.from_numpy(np.ascontiguousarray(q)).view(torch.uint8).reshape(rows, -1)


def real_blocks(model_path, name):
    from gemmalab.checkpoints.gguf_file import GGUFFile
    r = GGUFFile(model_path)
    t = r.tensor(name)
    raw = torch.from_numpy(r.data(t).copy()).view(t.shape[0], -1)
    return raw, t.ggml_type, t.shape[1], dequantize(r.data(t), t.ggml_type, t.shape)


SYNTHETIC = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
REAL = ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
        "blk.0.ffn_down.weight", "blk.2.ffn_down.weight", "token_embd.weight"]  # Q5_0 Q8_0 Q4_K Q6_K


def check_qlinear(raw, qtype, K, W):
    """Dequantization bit-exact; small batches equal quantize_act(x) @ W^T; large ones x @ W^T."""
    blocks, ktype = prepare_blocks(raw, int(qtype), K)
    assert torch.equal(ops.dequantize(blocks, ktype, K), W)
    lin = QuantLinear(K, W.shape[0], ktype, blocks)
    g = torch.Generator().manual_seed(1)
    for M in (1, 2, 3, 4, 5, 8, 32, 33):
        x = torch.randn(M, K, generator=g) * 4
        y = lin(x)
        ref = (ops.quantize_act(x) @ W.t()) if M <= 32 else x @ W.t()
        scale = ref.abs().max()
        assert (y - ref).abs().max() <= 2e-6 * scale * K ** 0.5, (qtype, M)


@pytest.mark.parametrize("qtype", SYNTHETIC, ids=lambda t: t.name)
def test_qlinear_synthetic_blocks(qtype):
    raw = random_blocks(qtype)
    W = torch.from_numpy(gguf.quants.dequantize(raw.numpy().reshape(48, -1), qtype)).float()
    check_qlinear(raw, qtype, 512, W)


@pytest.mark.parametrize("name", REAL)
def test_qlinear_real_270m_tensors(model_path, name):
    raw, qtype, K, W = real_blocks(model_path, name)
    if name == "token_embd.weight":  # 262k rows: check a slice of rows, all code paths
        raw, W = raw[:4096].contiguous(), W[:4096]
    check_qlinear(raw, qtype, K, W)


def test_activation_quantization_and_q8_0_quantizer():
    x = torch.randn(7, 256) * torch.logspace(-3, 3, 256)  # wildly different magnitudes per block
    xq = ops.quantize_act(x)
    d = x.view(7, 8, 32).abs().amax(-1, keepdim=True) / 127
    err = (x - xq).view(7, 8, 32).abs()
    assert (err <= d / 2 * (1 + 1e-6) + 1e-30).all()
    codes = (xq.view(7, 8, 32) / d.clamp_min(1e-30)).round()
    assert codes.abs().max() <= 127
    w = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32)
    ours = ops.quantize_q8_0(torch.from_numpy(w)).numpy().tobytes()
    assert ours == gguf.quants.quantize(w, T.Q8_0).tobytes()  # bit-identical to llama.cpp's


def test_q8_0_with_a_minus_128_code_keeps_the_two_sign_kernel():
    raw = random_blocks(T.Q8_0, rows=8, cols=128)
    W0 = ops.dequantize(raw, int(T.Q8_0), 128)
    blocks, ktype = prepare_blocks(raw, int(T.Q8_0), 128)
    assert ktype == Q8_0_SYM
    raw = raw.clone()
    raw[3, 2 + 5] = 0x80  # code -128 in row 3, block 0
    W = ops.dequantize(raw, int(T.Q8_0), 128)
    assert W[3, 5] == W[3, :32].min() < W0[3, :32].min()  # d * -128, beyond the symmetric range
    blocks, ktype = prepare_blocks(raw, int(T.Q8_0), 128)
    assert ktype == Q8_0
    check_qlinear(raw, T.Q8_0, 128, W)


def test_lm_head_recomputes_its_top_logits_in_fp32():
    """QuantEmbedding.as_linear: the integer GEMV's 8 largest logits per row are replaced by the
    fp32 products of the dequantized rows; every other logit stays the integer kernel's."""
    from gemmalab.quant.linear import REFINE_TOP, QuantEmbedding
    raw = random_blocks(T.Q8_0, rows=1000, cols=256, seed=5)
    blocks, ktype = prepare_blocks(raw, int(T.Q8_0), 256)
    W = ops.dequantize(blocks, ktype, 256)
    emb = QuantEmbedding(1000, 256, ktype, blocks)
    h = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    approx = ops.qlinear(h, blocks, ktype)
    out = emb.as_linear(h)
    top = approx.topk(REFINE_TOP, -1).indices
    picked = torch.zeros_like(out, dtype=torch.bool).scatter_(1, top, True)
    exact = h @ W.t()
    assert torch.allclose(out[picked], exact[picked], rtol=0, atol=1e-5)
    assert torch.equal(out[~picked], approx[~picked])
    assert not torch.allclose(approx[picked], exact[picked], rtol=0, atol=1e-5)  # it did change them
    with pytest.raises(RuntimeError, match="k must be"):
        ops.refine_top(approx, h, blocks, ktype, 0)


def test_q5_0_repack_is_lossless():
    raw = random_blocks(T.Q5_0, rows=16, cols=256)
    blocks, ktype = prepare_blocks(raw, int(T.Q5_0), 256)
    assert ktype == Q5_0_U8 and blocks.shape == (16, 8 * 34)
    assert torch.equal(ops.dequantize(blocks, ktype, 256), ops.dequantize(raw, int(T.Q5_0), 256))


def reference_attention(q, k, v, pos, rows, qpos, window, scale, softcap):
    out = []
    for b in range(q.shape[0]):
        r, p = int(rows[b]), int(qpos[b])
        P = pos[r]
        visible = (P >= 0) & (P <= p)
        if window:
            visible &= P > p - window
        G = q.shape[1] // k.shape[1]
        kk = k[r].repeat_interleave(G, 0)  # (H, S, D)
        vv = v[r].repeat_interleave(G, 0)
        s = torch.einsum("hd,hsd->hs", q[b], kk) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~visible, float("-inf"))
        out.append(torch.einsum("hs,hsd->hd", torch.softmax(s, -1), vv))
    return torch.stack(out)


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (24, 0.0), (0, 50.0)])
def test_decode_attention_matches_masked_softmax(window, softcap):
    g = torch.Generator().manual_seed(0)
    Bmax, Hkv, S, D, H = 3, 2, 600, 64, 4
    k, v = torch.randn(Bmax, Hkv, S, D, generator=g), torch.randn(Bmax, Hkv, S, D, generator=g)
    pos = torch.randint(-1, 500, (Bmax, S), generator=g)  # empty slots, shuffled positions
    rows, qpos = torch.tensor([2, 0, 2]), torch.tensor([450, 300, 120])  # rows shared, any order
    q = torch.randn(3, H, D, generator=g)
    got = ops.decode_attention(q, k, v, pos, rows, qpos, S, window, 0.125, softcap)
    ref = reference_attention(q, k, v, pos, rows, qpos, window, 0.125, softcap)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def tiny_quantized(name="tiny", mode="q8", seed=0):
    config = get_config(name)
    torch.manual_seed(seed)
    ref = Gemma3(config)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    return config, ref.eval(), build_quantized(config, {}, state, mode)


def copy_cache(src, dst):
    for a, b in zip(src.layers, dst.layers):
        b.k.copy_(a.k)
        b.v.copy_(a.v)
    dst.full_pos.copy_(src.full_pos)
    dst.ring_pos.copy_(src.ring_pos)
    dst.lengths.copy_(src.lengths)


@pytest.mark.parametrize("name", ["tiny", "tiny-27b-style", "tiny-gemma2"])
def test_fused_decode_matches_module_path(name):
    """The C++ block equals the modules (same quantized matmuls; SDPA vs C++ attention), step by
    step from the same cache, far past the window (the ring wraps several times).

    The two differ in float summation order (norms, attention), so now and then an activation
    lands on the other side of an int8 rounding boundary and that step's logits move by a few
    percent; a structural error (mask, RoPE, norm, cache slot) breaks every step instead.
    """
    config, _, model = tiny_quantized(name)
    W = config.sliding_window
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, 3 * W), generator=g)
    close = 0
    with torch.inference_mode():
        fused, module = model.make_cache(1, 16 * W), model.make_cache(1, 16 * W)
        model(ids, cache=fused)
        for t in range(3 * W, 16 * W):
            copy_cache(fused, module)
            tok = torch.randint(0, config.vocab_size, (1,), generator=g)
            a = model.decode_step(tok, torch.tensor([t]), fused)
            b = model(tok[:, None], torch.tensor([[t]]), module)[:, -1]
            err = ((a - b).abs().max() / b.abs().max()).item()
            close += err <= 1e-5
            assert err <= 0.05, (t, err)
    assert close >= 0.9 * 13 * W, close
    assert int(fused.lengths[0]) == 16 * W


def test_fused_rows_are_independent_of_the_batch():
    """Rows of different lengths (continuous batching), several tokens of one row (speculative
    verification): each token's logits are bit-identical to running it alone, one at a time."""
    config, _, model = tiny_quantized()
    g = torch.Generator().manual_seed(2)
    lens = [5, 17, 11]
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g) for n in lens]
    extra = torch.randint(0, config.vocab_size, (3, 4), generator=g)
    with torch.inference_mode():
        alone = []
        for b in range(3):
            c = model.make_cache(1, 64)
            model(prompts[b][None], cache=c)
            alone.append(torch.cat([model.decode_step(extra[b, i:i + 1], torch.tensor([lens[b] + i]), c)
                                    for i in range(4)]))
        c = model.make_cache(3, 64)
        for b in range(3):
            model(prompts[b][None], cache=c.rows(b, b + 1))
        # step 1: rows 2 and 0 only (row 1 idle), in that order
        s1 = model.decode_step(extra[[2, 0], 0], torch.tensor([lens[2], lens[0]]), c, rows=torch.tensor([2, 0]))
        # step 2: row 1 catches up with 3 tokens at once plus one token of row 0
        s2 = model.decode_step(torch.cat([extra[1, :3], extra[0, 1:2]]),
                               torch.tensor([lens[1], lens[1] + 1, lens[1] + 2, lens[0] + 1]), c,
                               rows=torch.tensor([1, 1, 1, 0]))
    assert torch.equal(s1[0], alone[2][0]) and torch.equal(s1[1], alone[0][0])
    assert torch.equal(s2[:3], alone[1][:3]) and torch.equal(s2[3], alone[0][1])
    assert c.lengths.tolist() == [lens[0] + 2, lens[1] + 3, lens[2] + 1]


def test_truncate_forgets_rejected_columns():
    config, _, model = tiny_quantized()
    W = config.sliding_window
    ids = torch.randint(0, config.vocab_size, (1, W + 9), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        c = model.make_cache(1, 64)
        model(ids[:, :W + 5], cache=c)
        ref = model.decode_step(ids[0, W + 5:W + 6], torch.tensor([W + 5]), c).clone()
        c.truncate(0, W + 5)
        model.decode_step(torch.tensor([7, 8, 9]), torch.tensor([W + 5, W + 6, W + 7]), c,
                          rows=torch.zeros(3, dtype=torch.long))  # a rejected draft
        c.truncate(0, W + 5)
        again = model.decode_step(ids[0, W + 5:W + 6], torch.tensor([W + 5]), c)
    assert torch.equal(again, ref)
    assert int((c.full_pos[0] >= 0).sum()) == W + 6 and int(c.full_pos[0].max()) == W + 5


@pytest.mark.parametrize("quantized", [False, True])
def test_prompt_lookup_greedy_equals_plain_greedy(quantized):
    config, ref, model = tiny_quantized(seed=5)
    model = model if quantized else ref
    g = torch.Generator().manual_seed(6)
    base = torch.randint(0, config.vocab_size, (12,), generator=g).tolist()
    prompt = base * 4  # repetitive: drafts get accepted
    greedy = SamplingParams(temperature=0)
    plain = [int(t) for t, _ in generate_steps(model, [prompt], 40, greedy)]
    stats: dict = {}
    spec = [int(t) for t, _ in generate_steps(model, [prompt], 40, greedy, stats=stats, lookup=6)]
    assert spec == plain
    assert stats["verify_steps"] < 40 and stats["drafted"] > 0


def test_prompt_lookup_sampling_keeps_the_distribution():
    """Speculative sampling with a one-hot draft is exact: the first token's empirical distribution
    matches plain sampling's (chi-square-style bound on a tiny model with a forced draft)."""
    config, _, model = tiny_quantized(seed=7)
    prompt = [3, 4, 5, 6, 3, 4, 5]  # "3 4 5" repeats, so the draft after 5 is [6, 3, 4, 5]
    params = SamplingParams(temperature=1.0, top_k=8, top_p=1.0)
    counts = {"plain": {}, "spec": {}}
    for seed in range(300):
        for kind, lookup in (("plain", 0), ("spec", 4)):
            steps = generate_steps(model, [prompt], 2, SamplingParams(1.0, 8, 1.0, seed), lookup=lookup)
            toks = tuple(int(t) for t, _ in steps)
            counts[kind][toks[1]] = counts[kind].get(toks[1], 0) + 1
    # the second token: drawn from the verification logits (accept/reject) vs plain decoding
    keys = set(counts["plain"]) | set(counts["spec"])
    tv = sum(abs(counts["plain"].get(k, 0) - counts["spec"].get(k, 0)) for k in keys) / 600
    assert tv < 0.15, (tv, counts)


# ---- the real 270M -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def native(model_path):
    return gemmalab.load(model_path)  # the default mode


def test_default_mode_is_native_and_compact(native):
    assert native.mode == "native"
    types = {m.qtype for m in native.model.modules() if isinstance(m, QuantLinear)}
    assert types == {Q8_0_SYM, 12, 14, Q5_0_U8}  # the file's Q8_0, Q4_K, Q6_K and Q5_0 blocks
    nbytes = sum(b.numel() for b in native.model.buffers())
    assert nbytes < 300e6  # vs 1.07 GB in fp32


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["native", "q8", "fp32"])
def test_every_mode_answers_sensibly(model_path, mode):
    lm = gemmalab.load(model_path, mode=mode)
    out = lm.generate("The capital of France is Paris. The capital of Germany is", max_new_tokens=4,
                      temperature=0)
    assert "Berlin" in out.text, out.text
    code = lm.generate("def add(a, b):\n    return", max_new_tokens=4, temperature=0)
    assert "a + b" in code.text, code.text


@pytest.mark.slow
def test_native_quality_against_fp32(lm, native):
    """Teacher-forced next-token distributions on 384 tokens of prose, through both code paths of the
    native mode. (bench/bench_inference.py measures >= 2K tokens for docs/benchmarks.md.)"""
    import sys
    from pathlib import Path
    text = (Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
            / "LICENSE.txt")
    text = text.read_text() if text.exists() else Path(gemmalab.__file__).with_name("tokenizer.py").read_text()
    ids = native.tokenizer.encode(text, add_bos=True)[:384]
    ref = torch.log_softmax(lm.logits(ids), -1)
    with torch.inference_mode():
        c = native.model.make_cache(1, len(ids))
        step = torch.cat([native.model.decode_step(torch.tensor([t]), torch.tensor([i]), c)
                          for i, t in enumerate(ids)])
    for name, logits in (("prefill", native.logits(ids)), ("decode", step)):
        lp = torch.log_softmax(logits, -1)
        kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
        top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"native {name} path: KL {kl:.5f}, top-1 {top1:.4f}")
        assert kl <= 0.02 and top1 >= 0.95, (name, kl, top1)


@pytest.mark.slow
def test_real_lookup_and_batching_are_exact(native):
    text = "The quick brown fox jumps over the lazy dog. " * 6
    plain = native.generate(text, max_new_tokens=24, temperature=0)
    spec = native.generate(text, max_new_tokens=24, temperature=0, lookup=8)
    assert spec.token_ids == plain.token_ids
    assert spec.stats["accepted"] > 10  # the continuation repeats the prompt
    prompts = ["def fibonacci(n):", "Once upon a time", text]
    batch = native.generate(prompts, max_new_tokens=12, temperature=0)
    assert [r.token_ids for r in batch] == [native.generate(p, max_new_tokens=12, temperature=0).token_ids
                                             for p in prompts]


def test_mode_errors(model_path):
    with pytest.raises(ValueError, match="unknown mode"):
        gemmalab.load(model_path, mode="int3")
    with pytest.raises(ValueError, match="float32"):
        gemmalab.load(model_path, mode="native", dtype=torch.bfloat16)
