"""Quantization-aware training (gemmalab/quant/fake.py, gemmalab/train/qat.py, the Q4_0 export):
fake quantization is bitwise the export grid (gguf.quants for Q4_0, on random and real 270M tensors),
the straight-through gradient is the identity, a fake-quantized model computes what its exported
file computes, QAT lowers KL(teacher || quantized student) below PTQ's, SIGKILL + resume is exact,
llama.cpp-style per-channel files share one scale per row, and the command line explains its errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf import quants

import gemmalab
from gemmalab.checkpoints.export import save_gguf
from gemmalab.quant.fake import (FakeQuantLinear, attach, fake_quant, fake_quant_embedding,
                                 materialize, move_off_ties, q4_0_bytes, q4_0_codes, q4_0_ties)
from gemmalab.train.config import ConfigError, QATConfig, build_config, check_qat_config

from .distill_helpers import kill_and_resume, text_data, tiny_teacher_gguf

REPO = str(Path(gemmalab.__file__).resolve().parents[1])
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


def gguf_q4_0(w: torch.Tensor) -> np.ndarray:
    return quants.dequantize(quants.quantize(w.numpy(), GT.Q4_0), GT.Q4_0)


def bits(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(np.uint32)


# ---- fake quantization == the export grid ----------------------------------------------------------

@pytest.mark.parametrize("scale", [1e-4, 0.02, 1.0, 300.0])
def test_q4_0_fake_quant_is_bitwise_gguf_quants(scale):
    g = torch.Generator().manual_seed(int(scale * 1e4) % 1000)
    w = torch.randn(48, 256, generator=g) * scale
    assert np.array_equal(bits(gguf_q4_0(w)), bits(fake_quant(w, "q4_0")))
    assert np.array_equal(quants.quantize(w.numpy(), GT.Q4_0), q4_0_bytes(w).numpy())


def test_q4_0_edge_blocks_zero_constant_and_ties():
    rows = [torch.zeros(32), torch.full((32,), 0.37), torch.full((32,), -2.5),
            torch.tensor([1.0, -1.0] * 16),  # +-max: the first of equal magnitudes sets the sign of d
            torch.tensor([-1.0, 1.0] * 16),
            torch.arange(-16, 16, dtype=torch.float32) / 16 * 0.8,
            # exact ties: k + 0.5 steps of d = max / -8 (max = -0.8, d = 0.1)
            torch.tensor([-0.8] + [(k + 0.5) * 0.1 for k in range(-8, 7)] * 2 + [0.05]),
            torch.tensor([1e-30] * 31 + [-1e-30])]
    w = torch.stack([r.float() for r in rows])
    assert np.array_equal(bits(gguf_q4_0(w)), bits(fake_quant(w, "q4_0")))
    assert np.array_equal(quants.quantize(w.numpy(), GT.Q4_0), q4_0_bytes(w).numpy())
    assert torch.equal(fake_quant(w[:1], "q4_0"), torch.zeros(1, 32))


def test_q8_0_embedding_fake_quant_is_bitwise_gguf_quants():
    w = torch.randn(64, 128) * 0.1
    ref = quants.dequantize(quants.quantize(w.numpy(), GT.Q8_0), GT.Q8_0)
    assert np.array_equal(bits(ref), bits(fake_quant_embedding(w, "q8_0")))
    assert torch.equal(fake_quant_embedding(w, "f16"), w.half().float())


def test_rne_differs_from_ref_only_on_ties():
    w = torch.tensor([[-0.8] + [(k + 0.5) * 0.1 for k in range(-8, 7)] * 2 + [0.05]])
    w = torch.cat([w, torch.randn(7, 32) * 0.3])
    q_ref, d_ref = q4_0_codes(w)
    q_rne, d_rne = q4_0_codes(w, rounding="rne")
    tie, _ = q4_0_ties(w)
    assert torch.equal(d_ref, d_rne)
    assert torch.equal(q_ref != q_rne, tie & (q_ref % 2 == 1))  # ref goes up, RNE to the even code
    assert tie[0, 1:31].all() and not tie[1:].any()


def test_int4_channel_shares_one_row_scale_and_exports_losslessly(tmp_path):
    w = torch.randn(16, 128) * 0.05
    w[3, 77] = 0.9  # one outlier: its row's scale is 10x the others'
    q, d = q4_0_codes(w, per_channel=True)
    assert (d == d[:, :1]).all()
    raw = q4_0_bytes(w, per_channel=True).numpy().reshape(16, 4, 18)
    assert (raw[:, :, :2] == raw[:, :1, :2]).all()  # every block of a row carries the same fp16 d
    # a GGUF Q4_0 reader sees exactly the per-channel values
    back = quants.dequantize(raw.reshape(16, -1), GT.Q4_0)
    assert np.array_equal(bits(back), bits(fake_quant(w, "int4_channel")))
    row_max = w.abs().amax(1, keepdim=True)
    err = (fake_quant(w, "int4_channel") - w).abs()
    # half a step, except beyond +7.5 steps on the side opposite the max (level +8 does not exist)
    assert (err <= row_max / 8 * 1.001).all() and (err <= row_max / 8 * 0.5 * 1.001).float().mean() > 0.99


def test_straight_through_gradient_is_the_identity():
    lin = torch.nn.Linear(64, 8, bias=False)
    for fmt in ("q4_0", "int4_channel", "sfp8"):
        fq = FakeQuantLinear(lin, fmt)
        w = fq.quantized_weight()
        g = torch.randn_like(w)
        lin.weight.grad = None
        (w * g).sum().backward()
        assert torch.equal(lin.weight.grad, g)
        assert torch.equal(w.detach(), fake_quant(lin.weight, fmt))


def test_move_off_ties_keeps_the_quantized_values():
    w = torch.tensor([[-0.8] + [(k + 0.5) * 0.1 for k in range(-8, 7)] * 2 + [0.05]] * 4)
    for rounding in ("ref", "rne"):
        model = torch.nn.Module()
        model.q_proj = torch.nn.Linear(32, 4, bias=False)
        with torch.no_grad():
            model.q_proj.weight.copy_(w)
        attach(model, "q4_0", rounding=rounding)
        before = model.q_proj.quantized_weight().detach().clone()
        assert move_off_ties(model, max_margin=0.25) == int(q4_0_ties(w)[0].sum()) == 4 * 31  # all but the max
        assert torch.equal(model.q_proj.quantized_weight(), before)
        assert not q4_0_ties(model.q_proj.weight)[0].any()
        assert (model.q_proj.weight - w).abs().max() <= 0.25 * 0.1 + 1e-6


# ---- the real 270M ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_layers(model_path):
    """Layers 0-1 of the real 270M: the raw GGUF bytes and types, and their fp32 dequantization."""
    from gguf import GGUFReader

    from gemmalab.quant.gguf_blocks import dequantize
    r = GGUFReader(str(model_path))
    out = {}
    for t in r.tensors:
        if t.name.startswith(("blk.0.", "blk.1.")) and len(t.shape) == 2:
            shape = (int(t.shape[1]), int(t.shape[0]))  # GGUF's ne reversed
            out[t.name] = (t.tensor_type.name, dequantize(np.asarray(t.data), int(t.tensor_type), shape))
    return out


def test_q4_0_fake_quant_is_bitwise_on_real_tensors_of_every_source_type(real_layers):
    types = {typ for typ, _ in real_layers.values()}
    assert {"Q5_0", "Q4_K", "Q6_K", "Q8_0"} <= types, types
    for name, (typ, w) in real_layers.items():
        assert np.array_equal(bits(gguf_q4_0(w)), bits(fake_quant(w, "q4_0"))), name


def test_q5_0_sourced_tensors_sit_on_q4_0_ties_and_ref_rounding_biases_them(real_layers):
    """The teacher's Q5_0 blocks are an exact super-grid of Q4_0: about half their weights sit on
    Q4_0 ties, which ggml's rounding breaks upwards (a per-block bias); ties to even do not."""
    typ, w = real_layers["blk.0.attn_q.weight"]
    assert typ == "Q5_0"
    tie, d = q4_0_ties(w)
    assert 0.4 < tie.float().mean() < 0.55
    # in units of the signed step d = max / -8 (q space): ggml's trunc(y + 8.5) takes every tie up
    bias_ref = ((fake_quant(w, "q4_0") - w) / d).mean()
    bias_rne = ((fake_quant(w, "q4_0", rounding="rne") - w) / d).mean()
    assert bias_ref > 0.15 and abs(bias_rne) < 0.02, (bias_ref, bias_rne)
    _, w_k = real_layers["blk.0.attn_output.weight"]  # Q4_K: no ties
    assert q4_0_ties(w_k)[0].float().mean() < 1e-3


@pytest.mark.slow
def test_q4_0_export_of_the_270m(lm, tmp_path, model_path):
    """Matrices Q4_0, norms F32, and the Q8_0 embedding re-exported byte-identical to the source."""
    from gguf import GGUFReader
    out = save_gguf(lm.model, lm.tokenizer, tmp_path / "q4_0.gguf", "q4_0")
    src = {t.name: t for t in GGUFReader(str(model_path)).tensors}
    dst = {t.name: t for t in GGUFReader(str(out)).tensors}
    assert dst.keys() == src.keys()
    for name, t in dst.items():
        want = "F32" if len(t.shape) == 1 else "Q8_0" if name == "token_embd.weight" else "Q4_0"
        assert t.tensor_type.name == want, name
    assert src["token_embd.weight"].tensor_type.name == "Q8_0"
    assert np.array_equal(np.asarray(src["token_embd.weight"].data), np.asarray(dst["token_embd.weight"].data))
    w = lm.model.layers[0].self_attn.q_proj.weight.detach()
    assert np.array_equal(np.asarray(dst["blk.0.attn_q.weight"].data).reshape(w.shape[0], -1),
                          quants.quantize(w.numpy(), GT.Q4_0))
    from gguf import GGUFReader as R
    assert int(R(str(out)).fields["general.file_type"].parts[-1][0]) == 2  # MOSTLY_Q4_0


# ---- tiny models: a fake-quantized model computes what its file computes --------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qat")
    teacher = tiny_teacher_gguf(root / "teacher.gguf")
    data = text_data(root / "train.jsonl", 80)
    held = text_data(root / "held.jsonl", 12, seed=7)
    return root, teacher, data, held


def tiny_ids(tokenizer, held: Path, n: int = 48) -> list[list[int]]:
    return [tokenizer.encode(json.loads(line)["text"], add_bos=True)[:n] for line in open(held)]


@pytest.mark.parametrize("fmt", ["q4_0", "int4_channel", "sfp8"])
def test_fake_quantized_model_equals_the_model_with_quantized_weights(tiny, fmt):
    root, teacher, _, held = tiny
    lm = gemmalab.load(teacher, mode="fp32")
    ref = gemmalab.load(teacher, mode="fp32").model
    attach(lm.model, fmt, embedding="f16")
    with torch.no_grad():
        for (name, p), (_, q) in zip(lm.model.named_parameters(), ref.named_parameters()):
            if name.endswith("proj.weight"):
                q.copy_(fake_quant(p, fmt))
            elif name == "embed_tokens.weight":
                q.copy_(p)
    x = torch.tensor([tiny_ids(lm.tokenizer, held)[0]])
    with torch.no_grad():
        assert torch.equal(lm.model(x), ref(x))
        baked = materialize(lm.model)
        assert torch.equal(baked(x), ref(x))
    assert not any(isinstance(m, FakeQuantLinear) for m in baked.modules())


def qat_raw(root, teacher, data, out, steps=30, **qat):
    return {"model": {"path": str(teacher), "autocast": "none"},
            "data": {"train": [str(data)], "batch_size": 2, "seq_len": 48},
            "optim": {"lr": 1e-3, "warmup_steps": 2},
            "run": {"out_dir": str(out), "steps": steps, "log_every": 5, "save_every": 5, "threads": 1},
            "qat": {"embedding": "q8_0", **qat}}


def held_kl(T, model, ids) -> float:
    from gemmalab.eval.scoring import score_hidden
    tot, n = 0.0, 0
    with torch.no_grad():
        for c in ids:
            x = torch.tensor([c])
            sc = score_hidden(model, model.hidden_states(x)[0], x[0], ref_model=T,
                              ref_hidden=T.hidden_states(x)[0])
            tot, n = tot + float(sc.kl.double().sum()), n + sc.kl.numel()
    return tot / n


@pytest.fixture(scope="module")
def qat_run(tiny):
    root, teacher, data, _ = tiny
    from gemmalab.train.recipes.qat import train_qat
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_qat(check_qat_config(build_config(qat_raw(root, teacher, data, root / "run"), QATConfig)),
                  progress=False)
    finally:
        torch.set_num_threads(before)
    return root / "run"


def test_tiny_qat_lowers_kl_below_ptq(tiny, qat_run):
    root, teacher, _, held = tiny
    from gemmalab.train.recipes.qat import load_qat_run
    T = gemmalab.load(teacher, mode="fp32").model
    ptq = gemmalab.load(teacher, mode="fp32").model
    attach(ptq, "q4_0", embedding="q8_0")
    student, tok, cfg = load_qat_run(qat_run, quantized=True)
    ids = tiny_ids(tok, held)
    kl_ptq, kl_qat = held_kl(T, ptq, ids), held_kl(T, student, ids)
    assert kl_qat < 0.9 * kl_ptq, (kl_qat, kl_ptq)
    rows = [json.loads(x) for x in (qat_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert cfg.qat.format == "q4_0" and cfg.distill.teacher == str(teacher)


def test_qat_export_reloads_to_the_fake_quantized_logits(tiny, qat_run, tmp_path):
    """gemmalab export RUN --to gguf: fp32 reload == fake-quant forward; native top-1 >= 95%."""
    root, teacher, _, held = tiny
    from gemmalab.train.recipes.qat import load_qat_run
    out = tmp_path / "qat.gguf"
    proc = subprocess.run([sys.executable, "-m", "gemmalab", "export", str(qat_run), "--to", "gguf", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from gguf import GGUFReader
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    fq, tok, _ = load_qat_run(qat_run, quantized=True)
    fp32 = gemmalab.load(out, mode="fp32")
    native = gemmalab.load(out, mode="native")
    agree = total = 0
    with torch.no_grad():
        for c in tiny_ids(tok, held):
            x = torch.tensor([c])
            a, b = fq(x), fp32.model(x)
            assert (a - b).abs().max() <= 1e-6
            n = native.logits(c)
            agree += int((n.argmax(-1) == a[0].argmax(-1)).sum())
            total += len(c)
    assert agree / total >= 0.95, agree / total
    # the trained matrices are not on the grid themselves (they are the "unquantized" QAT weights)
    raw_w, _, _ = load_qat_run(qat_run, quantized=False)
    assert not torch.equal(raw_w.layers[0].self_attn.q_proj.weight, fp32.model.layers[0].self_attn.q_proj.weight)


def test_sfp8_and_per_channel_qat_export(tiny, tmp_path):
    root, teacher, data, held = tiny
    from gemmalab.train.recipes.qat import load_qat_run, train_qat
    for fmt, to, dtype in (("int4_channel", "gguf", None), ("sfp8", "hf", None)):
        run = tmp_path / fmt
        train_qat(check_qat_config(build_config(qat_raw(root, teacher, data, run, steps=4, format=fmt),
                                                QATConfig)), progress=False)
        out = tmp_path / (f"{fmt}.gguf" if to == "gguf" else f"{fmt}-hf")
        cmd = [sys.executable, "-m", "gemmalab", "export", str(run), "--to", to, str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stderr
        fq, tok, _ = load_qat_run(run, quantized=True)
        back = gemmalab.load(out, mode="fp32")
        x = torch.tensor([tiny_ids(tok, held)[0]])
        with torch.no_grad():
            assert (fq(x) - back.model(x)).abs().max() <= 1e-6, fmt
        if fmt == "sfp8":
            on_the_fly = gemmalab.load(out)
            assert on_the_fly.mode == "sfp8"
            with torch.no_grad():
                assert (on_the_fly.model(x) - fq(x)).abs().max() <= 1e-5


RUNNER = """
import json, sys
from gemmalab.train.config import QATConfig, build_config, check_qat_config
from gemmalab.train.recipes.qat import train_qat
train_qat(check_qat_config(build_config(json.loads(sys.argv[1]), QATConfig)), resume=sys.argv[2] == "1",
          progress=False)
"""


def test_sigkill_then_resume_equals_uninterrupted(tiny, tmp_path):
    root, teacher, data, _ = tiny
    raws = [qat_raw(root, teacher, data, tmp_path / out, steps=16) for out in ("a", "b")]
    for raw in raws:
        raw["run"]["save_every"] = 2
    kill_and_resume(RUNNER, *raws, ENV)


# ---- configuration and command line ----------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"qat": {"format": "int3"}}, "qat.format"),
    ({"qat": {"embedding": "q4_0"}}, "qat.embedding"),
    ({"qat": {"modules": ["lm_head"]}}, "qat.modules"),
    ({"qat": {"tie_margin": 0.5}}, "tie_margin"),
    ({"lora": {"rank": 8}}, "lora.rank = 0"),
    ({"model": {"preset": "tiny"}}, "model.path"),
])
def test_bad_qat_configs_are_refused_with_the_fix(change, message):
    raw = {"data": {"train": ["x.jsonl"]}}
    for k, v in change.items():
        raw.setdefault(k, {}).update(v)
    with pytest.raises(ConfigError, match=message):
        check_qat_config(build_config(raw, QATConfig))


def test_cli_train_qat_and_export_errors(tiny, tmp_path):
    root, teacher, data, _ = tiny
    cfg = tmp_path / "qat.json"
    cfg.write_text(json.dumps(qat_raw(root, teacher, data, tmp_path / "r", steps=2)))
    cli = [sys.executable, "-m", "gemmalab"]
    p = subprocess.run(cli + ["train", "qat", str(cfg), "qat.format=int3"], capture_output=True, text=True,
                       env=ENV)
    assert p.returncode == 1 and "qat.format must be one of" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run(cli + ["train", "qat", str(cfg), "--no-progress"], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "export with: gemmalab export" in p.stdout and "fake-quantized as q4_0" in p.stderr
    p = subprocess.run(cli + ["export", str(tmp_path / "r"), "--to", "gguf", str(tmp_path / "x.gguf"),
                              "--dtype", "q5_0"], capture_output=True, text=True, env=ENV)
    assert p.returncode == 1 and "not a GGUF dtype" in p.stderr
    p = subprocess.run(cli + ["export", str(tmp_path / "r"), "--to", "gguf", str(tmp_path / "x.gguf"),
                              "--dtype", "q4_0_channel"], capture_output=True, text=True, env=ENV)
    assert p.returncode == 0 and "was trained on q4_0" in p.stderr  # a warning, then the export
