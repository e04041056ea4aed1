"""gemmalab eval: perplexity (llama-perplexity protocol), long-context probes, RULER-offline, RoPE override."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from difflib import SequenceMatcher

import numpy as np
import pytest
import torch

import gemmalab
from gemmalab.cli import main
from gemmalab.eval import long_context as lc
from gemmalab.eval import ruler
from gemmalab.eval.perplexity import perplexity
from gemmalab.model.text import rope_tables

from .distill_helpers import tiny_teacher_gguf
from .test_export import CORPUS


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return tiny_teacher_gguf(tmp_path_factory.mktemp("eval") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return gemmalab.load(tiny_path, mode="fp32")


def _ids(n, seed=0, bos=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(13, 500, (n,), generator=g).tolist()
    ids[0] = bos
    return ids


def _naive_chunk_nll(lm, ids, ctx, n_chunks):
    """The protocol spelled out: chunk c = ids[c*ctx:(c+1)*ctx] with its first token replaced by
    BOS, full logits, positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1."""
    out = []
    for c in range(n_chunks):
        chunk = list(ids[c * ctx:(c + 1) * ctx])
        chunk[0] = lm.config.bos_token_id
        logp = lm.logits(chunk).log_softmax(-1).double().numpy()
        for p in range(ctx // 2, ctx - 1):
            out.append(-logp[p, chunk[p + 1]])
    return np.array(out)


def test_perplexity_equals_naive_reference(tiny):
    ctx = 32
    ids = _ids(5 * ctx + 7)  # 5 chunks; the 7 leftover tokens are never scored
    r = perplexity(tiny, ids, ctx=ctx)
    nll = _naive_chunk_nll(tiny, ids, ctx, 5)
    assert r["tokens_scored"] == 5 * (ctx // 2 - 1) == nll.size
    assert r["chunks"] == 5
    ppl = math.exp(nll.mean())
    err = ppl * math.sqrt((np.mean(nll ** 2) - nll.mean() ** 2) / (nll.size - 1))
    assert r["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert r["ppl_stderr"] == pytest.approx(err, rel=1e-4)
    running = [math.exp(_naive_chunk_nll(tiny, ids, ctx, k).mean()) for k in (1, 3)]
    assert r["running_ppl"][0] == pytest.approx(running[0], rel=1e-5)
    assert r["running_ppl"][2] == pytest.approx(running[1], rel=1e-5)
    # --chunks N keeps the first N; batching chunks changes nothing
    r2 = perplexity(tiny, ids, ctx=ctx, chunks=2, batch=2)
    assert r2["tokens_scored"] == 2 * 15
    assert r2["ppl"] == pytest.approx(math.exp(nll[:30].mean()), rel=1e-5)
    # BOS overwrites the first token: inserting it instead would score other contexts
    inserted = []
    for c in range(5):
        chunk = [2] + list(ids[c * ctx:(c + 1) * ctx - 1])
        logp = tiny.logits(chunk).log_softmax(-1).double().numpy()
        inserted += [-logp[p, chunk[p + 1]] for p in range(16, 31)]
    assert abs(math.exp(np.mean(inserted)) - r["ppl"]) > 1e-3


def test_perplexity_kl_against_reference(tiny, tiny_path, tmp_path):
    ids = _ids(3 * 32, seed=1)
    same = perplexity(tiny, ids, ctx=32, reference=tiny)["kl"]
    assert same["mean_kld"] < 1e-6 and same["same_top_p"] == 100.0
    other = gemmalab.load(tiny_teacher_gguf(tmp_path / "other.gguf", seed=5), mode="fp32")
    r = perplexity(tiny, ids, ctx=32, reference=other)
    kls, agree = [], []
    for c in range(3):
        chunk = list(ids[c * 32:(c + 1) * 32])
        chunk[0] = 2
        p = tiny.logits(chunk).log_softmax(-1).double()[16:31]
        q = other.logits(chunk).log_softmax(-1).double()[16:31]
        kls += (q.exp() * (q - p)).sum(-1).tolist()
        agree += (p.argmax(-1) == q.argmax(-1)).tolist()
    assert r["kl"]["mean_kld"] == pytest.approx(np.mean(kls), rel=1e-4)
    assert r["kl"]["kld"]["max"] == pytest.approx(max(kls), rel=1e-4)
    assert r["kl"]["same_top_p"] == pytest.approx(100 * np.mean(agree))
    assert r["kl"]["reference_ppl"] != pytest.approx(r["ppl"])


def test_perplexity_cli(tiny_path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(CORPUS * 4)
    out = tmp_path / "rep"
    p = subprocess.run([sys.executable, "-m", "gemmalab", "eval", "perplexity", str(text), "--model",
                        str(tiny_path), "--mode", "fp32", "--ctx", "64", "--json", "--out", str(out),
                        "--no-progress"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert {"ppl", "ppl_stderr", "tokens_scored"} <= set(r)
    assert r["tokens_scored"] == r["chunks"] * 31 and r["ppl"] > 1
    assert json.loads((out / "perplexity.json").read_text())["ppl"] == r["ppl"]
    assert "PPL" in (out / "perplexity.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["missing.txt"], "text file not found"),
    (["EMPTY"], "is empty"),
    (["SHORT"], "needs at least"),
    (["LONG", "--ctx", "1024"], "longer than the model's context"),
    (["LONG", "--model", "nope.gguf"], "model not found"),
])
def test_perplexity_bad_inputs(tiny_path, tmp_path, capsys, argv, message):
    files = {"EMPTY": "  \n", "SHORT": "hello world", "LONG": CORPUS * 20}
    argv = [str(tmp_path / a) if a in files else a for a in argv]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if "--model" not in argv:
        argv += ["--model", str(tiny_path)]
    assert main(["eval", "perplexity", *argv, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gemmalab: error:") and message in err[0]


# ---- long context --------------------------------------------------------------------------------

def test_position_nll_and_window_baseline_equal_naive(tiny):
    ids = _ids(100, seed=2)
    full = lc.position_nll(tiny.model, ids, chunk=16)  # several cache chunks, window 8
    logp = tiny.logits(ids).log_softmax(-1).double()
    naive = -logp[torch.arange(99), torch.tensor(ids[1:])]
    torch.testing.assert_close(full.double(), naive, rtol=1e-4, atol=1e-4)
    W = 12
    win = lc.window_nll(tiny.model, ids, W)
    expect = naive.clone()
    for t in range(2 * W, 100):  # target t sees BOS + ids[s-W : t], s = start of its window
        s = 2 * W + ((t - 2 * W) // W) * W
        ctx = [2] + ids[s - W:t]
        expect[t - 1] = -tiny.logits(ctx).log_softmax(-1).double()[-1, ids[t]]
    torch.testing.assert_close(win.double(), expect, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(win[2 * W:], full[2 * W:])  # the baseline really cuts context


def test_position_bins():
    nll = torch.arange(1, 600, dtype=torch.float64)  # nll[p-1] belongs to position p
    bins = lc.position_bins(nll, (1, 128, 512, 2048))
    assert [b["tokens"] for b in bins] == [127, 384, 88]
    assert bins[0]["nll"] == pytest.approx(np.mean(np.arange(1, 128)))
    assert bins[2]["nll"] == pytest.approx(np.mean(np.arange(512, 600)))


def test_passkey_prompt_is_llama_cpp_string():
    # examples/passkey/passkey.cpp with n_junk = 3, i_pos = 1, passkey = 4242
    junk = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    expect = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
              "them. I will quiz you about the important information there." + junk +
              " The pass key is 4242. Remember it. 4242 is the pass key." + junk + junk +
              " What is the pass key? The pass key is")
    assert lc.passkey_prompt(3, 1, 4242) == expect
    assert lc.passkey_prompt(2, 0, 7).count("The pass key is 7.") == 1
    with pytest.raises(ValueError):
        lc.passkey_prompt(3, 3, 1)


def test_passkey_case_fits_length(lm):
    tok = lm.tokenizer
    for L, depth in ((1024, 0.1), (2048, 0.5), (4096, 0.9)):
        case = lc.passkey_case(tok, L, depth, 31337)
        assert len(case["ids"]) <= L
        bigger = lc.passkey_prompt(case["n_junk"] + 1, min(case["n_junk"], int((case["n_junk"] + 1) * depth)), 31337)
        assert len(tok.encode(bigger, add_bos=True)) > L  # the largest junk count that fits
        assert case["i_pos"] == int(case["n_junk"] * depth)
        assert case["prompt"].count("31337 is the pass key") == 1


def test_greedy_with_logprob_matches_generate_and_logits(tiny):
    ids = _ids(40, seed=3)
    answer = [17, 99, 301]
    out, lp = lc.greedy_with_logprob(tiny.model, ids, answer, max_new_tokens=6)
    ref = tiny.generate(ids, 6, temperature=0, stop_ids=[1])
    assert out == ref.token_ids
    logp = tiny.logits(ids + answer).log_softmax(-1).double()
    expect = sum(float(logp[len(ids) - 1 + i, a]) for i, a in enumerate(answer))
    assert lp == pytest.approx(expect, abs=1e-4)


# ---- RULER-offline -------------------------------------------------------------------------------

@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_ruler_generators_deterministic_and_fitted(lm, task):
    L = 4096
    a = ruler.generate(task, L, lm.tokenizer, seed=3, index=1)
    b = ruler.generate(task, L, lm.tokenizer, seed=3, index=1)
    c = ruler.generate(task, L, lm.tokenizer, seed=4, index=1)
    assert a == b and a.prompt != c.prompt
    n = len(lm.tokenizer.encode(a.prompt, add_bos=True))
    assert n == a.prompt_tokens and 0.9 * L <= n <= L - a.tokens_to_generate
    assert a.answers and all(ans in a.prompt for ans in a.answers)


def test_ruler_needle_at_requested_depth_exactly_once(lm):
    for depth in (0, 25, 50, 100):
        s = ruler.generate("niah_single_1", 2048, lm.tokenizer, seed=0, depth=depth)
        (needle,) = s.meta["needles"]
        assert s.prompt.count(needle) == 1
        before = s.prompt.split(needle)[0].count(ruler.NOISE)
        assert before == int(s.meta["units"] * depth / 100)
        assert s.answers[0] in needle
    s = ruler.generate("niah_multikey_2", 2048, lm.tokenizer, seed=0, depth=50)
    (needle,) = s.meta["needles"]
    assert s.prompt.count(needle) == 1 and s.prompt.count("One of the special magic") > 10


def test_ruler_answers(lm):
    s = ruler.generate("vt", 2048, lm.tokenizer, seed=1)
    chain = s.meta["chain"]
    assert [stmt.split()[1] for stmt in chain] == s.answers and len(s.answers) == 5
    positions = [s.prompt.index(stmt) for stmt in chain]
    assert positions == sorted(positions)  # the chain appears in order
    s = ruler.generate("fwe", 2048, lm.tokenizer, seed=1)
    words = s.prompt.split("coded words. ")[1].split("\nQuestion")[0].split()
    counts = {w: words.count(w) for w in set(words) if w != "...."}
    top = sorted(counts, key=lambda w: (-counts[w], w))[:3]
    assert s.answers == top
    s = ruler.generate("cwe", 4096, lm.tokenizer, seed=1)
    for w in s.answers:
        assert s.prompt.count(f". {w}\n") + s.prompt.endswith(f". {w}") >= 29


def test_ruler_scorers_hand_computed():
    preds = ["The numbers are 123 and 456.", "nothing here", "ABC-def"]
    refs = [["123", "789"], ["x"], ["abc-DEF"]]
    assert ruler.string_match_all(preds, refs) == pytest.approx(100 * (0.5 + 0 + 1) / 3)
    assert ruler.string_match_part(preds, refs) == pytest.approx(100 * 2 / 3)
    assert ruler.mrcr_grade("abcd", "abce", "ab") == pytest.approx(SequenceMatcher(None, "cd", "ce").ratio())
    assert ruler.mrcr_grade("xyz-poem", "xyz-poem", "xyz-") == 1.0
    assert ruler.mrcr_grade("poem", "xyz-poem", "xyz-") == 0.0
    assert ruler.mrcr_grade("rnd1abcd", "rnd1abce", "rnd1") == pytest.approx(0.75)
    with pytest.raises(ValueError):
        ruler.string_match_all([], [])
    with pytest.raises(ValueError, match="unknown RULER-offline task"):
        ruler.generate("qa_1", 4096, None)


# ---- RoPE override -------------------------------------------------------------------------------

def _ropes(model, T=20):
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[1]))
             for i, layer in enumerate(model.layers)]
    with torch.inference_mode():
        model(torch.arange(3, 3 + T)[None])
    for h in hooks:
        h.remove()
    return seen


def test_rope_override_changes_global_layers_only(tiny_path, tmp_path):
    from gemmalab.config import FULL
    base = gemmalab.load(tiny_path, mode="fp32")
    pi = gemmalab.load(tiny_path, mode="fp32", rope_scaling_factor=4.0, max_context=2048)
    assert pi.config.rope_scaling_factor == 4.0 and pi.config.max_position_embeddings == 2048
    assert pi.config.rope_local_scaling_factor == 1.0
    a, b = _ropes(base.model), _ropes(pi.model)
    c = pi.config
    pos = torch.arange(20)[None]
    for i, t in enumerate(c.layer_types):
        if t == FULL:
            assert not torch.equal(a[i][0], b[i][0])
            cos, sin = rope_tables(pos, c.head_dim, c.rope_theta, 4.0, torch.float32)
            assert torch.equal(b[i][0], cos) and torch.equal(b[i][1], sin)
        else:
            assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    # the pitfall setting scales the local layers too, and cannot be exported
    bad = gemmalab.load(tiny_path, mode="fp32", rope_scaling_factor=2.0, rope_local_scaling_factor=2.0)
    r = _ropes(bad.model)
    local = c.layer_types.index("sliding_attention")
    assert not torch.equal(r[local][0], a[local][0])
    from gemmalab.checkpoints.export import save_gguf
    with pytest.raises(ValueError, match="local layers"):
        save_gguf(bad.model, bad.tokenizer, tmp_path / "bad.gguf", "f32")
    # a GGUF written with the factor reloads with it
    out = save_gguf(pi.model, pi.tokenizer, tmp_path / "pi.gguf", "f32")
    again = gemmalab.load(out, mode="fp32")
    assert again.config.rope_scaling_factor == 4.0
    ids = list(range(3, 40))
    torch.testing.assert_close(again.logits(ids), pi.logits(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="rope_scaling_factor"):
        gemmalab.load(tiny_path, mode="fp32", rope_scaling_factor=-1)


def test_rope_override_native_fused_decoder(tiny_path):
    """The quantized fused decode step takes the same override (global inv_freq only)."""
    base = gemmalab.load(tiny_path, mode="q8")
    pi = gemmalab.load(tiny_path, mode="q8", rope_scaling_factor=4.0)
    ids = list(range(3, 40))
    r0 = base.generate(ids, 4, temperature=0)
    r1 = pi.generate(ids, 4, temperature=0)
    ref = gemmalab.load(tiny_path, mode="q8", rope_scaling_factor=4.0)
    # the fused step must agree with the module path of the same model (prefill + greedy argmax)
    logits = ref.logits(ids + r1.token_ids[:-1])
    assert logits.argmax(-1)[len(ids) - 1:].tolist() == r1.token_ids
    assert r0.token_ids != r1.token_ids or not torch.equal(base.logits(ids), pi.logits(ids))


def test_long_context_cli(tiny_path, tmp_path, capsys):
    out = tmp_path / "lc"
    rc = main(["eval", "long-context", "--model", str(tiny_path), "--mode", "fp32", "--probes",
               "position,passkey", "--position-length", "300", "--doc", "stdlib", "--window", "16",
               "--passkey-lengths", "400", "--passkey-depths", "0.5", "--out", str(out), "--json",
               "--no-progress"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["position"]["tokens"] == 300 and r["position"]["bins"][0]["tokens"] == 127
    assert len(r["passkey"]["rows"]) == 1 and r["passkey"]["rows"][0]["prompt_tokens"] <= 400
    for f in ("long_context.json", "long_context.md", "position.png", "passkey.png"):
        assert (out / f).stat().st_size > 0
    assert main(["eval", "long-context", "--model", str(tiny_path), "--probes", "nope"]) == 1
    assert "unknown probes" in capsys.readouterr().err
    assert main(["eval", "long-context", "--model", str(tiny_path), "--probes", "position",
                 "--position-length", "4k"]) == 1
    assert "exceeds the model's context" in capsys.readouterr().err
