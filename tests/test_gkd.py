"""`gemmalab train gkd` on tiny models: lmbda = 0 is supervised KD on the dataset's answers (equal to
the offline KD loss on the same batch), lmbda = 1 trains on the student's own samples (drawn without
gradients, reproducible per row), the context-distillation teacher equals running the prefixed
sequence, every divergence trains, SIGKILL + resume is exact, torchrun 2 processes == 1."""
import json
import subprocess
import sys

import pytest
import torch

from gemmalab.train.config import ConfigError, build_config

from .distill_helpers import chat_data, kill_and_resume, tiny_teacher_gguf
from .test_distill_train import ENV, STUDENT


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gkd")
    tiny_teacher_gguf(root / "teacher.gguf")
    chat_data(root / "train.jsonl")
    return root


def raw_config(root, out, steps=6, **gkd):
    return {"model": dict(STUDENT), "data": {"train": [str(root / "train.jsonl")], "batch_size": 2, "seq_len": 40},
            "optim": {"lr": 1e-2, "warmup_steps": 1},
            "run": {"out_dir": str(out), "steps": steps, "log_every": 1, "save_every": 2, "threads": 1},
            "gkd": {"teacher": str(root / "teacher.gguf"), "max_new_tokens": 12, **gkd}}


def cfg_of(raw):
    from gemmalab.train.recipes.gkd import GKDConfig, check_gkd_config
    return check_gkd_config(build_config(raw, GKDConfig))


def parts(root, raw):
    """(cfg, student, teacher, tokenizer, first micro-batch) as train_gkd builds them."""
    from gemmalab.train.build import build_model_and_tokenizer, load_frozen
    from gemmalab.train.data import PromptDataset

    cfg = cfg_of(raw)
    teacher, tok = load_frozen(cfg.gkd.teacher, torch.device("cpu"))
    model, tok = build_model_and_tokenizer(cfg, torch.device("cpu"), tok)
    data = PromptDataset(cfg.data.train, tok, cfg.data.seq_len, cfg.data.batch_size, seed=0,
                         max_prompt_len=cfg.data.seq_len - cfg.gkd.max_new_tokens)
    return cfg, model, teacher, tok, next(iter(data))


def test_lmbda_0_is_supervised_kd_on_the_dataset_answers(setup, tmp_path):
    from gemmalab.train.losses import naive_full_kd_loss
    from gemmalab.train.recipes.gkd import Teacher, _prepare, gkd_loss

    cfg, model, teacher, tok, batch = parts(setup, raw_config(setup, tmp_path, lmbda=0.0, divergence="fkl"))
    prepared = _prepare(cfg, Teacher(teacher, [], tok.bos_id), tok, rank=0)(model, dict(batch), 0, 0)
    assert torch.equal(prepared["input_ids"], batch["input_ids"])  # the reference answers are kept
    assert not prepared["on_policy"].any()
    n = float((batch["targets"] != -100).sum())
    loss, metrics = gkd_loss(model, prepared, n, cfg, Teacher(teacher, [], tok.bos_id))
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    # offline KD on the same batch: full teacher logits, naive full-vocabulary forward KL
    with torch.no_grad():
        th = teacher.hidden_states(batch["input_ids"], batch["positions"], segment_ids=batch["segment_ids"])
        tl = th @ teacher.embed_tokens.weight.t()
        cap = teacher.config.final_logit_softcapping
        tl = torch.tanh(tl / cap) * cap if cap else tl
    h = model.hidden_states(batch["input_ids"], batch["positions"], segment_ids=batch["segment_ids"])
    ref = naive_full_kd_loss(h, model.embed_tokens.weight, batch["targets"], tl,
                             softcap=model.config.final_logit_softcapping, normalizer=n)
    ref.backward()
    # offline KD (the distill recipe's "full" loss) is the cross-entropy to the teacher; forward KL is
    # that minus the teacher's entropy (a constant): equal gradients, values apart by H(teacher)
    mask = batch["targets"].reshape(-1) != -100
    logq = torch.log_softmax(tl.reshape(-1, tl.shape[-1]).double(), -1)[mask]
    entropy = float(-(logq.exp() * logq).sum()) / n
    torch.testing.assert_close(loss.double(), ref.double() - entropy, rtol=1e-5, atol=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-7)
    assert metrics["on_policy"] == 0


def test_lmbda_1_trains_on_the_students_own_samples(setup, tmp_path):
    from gemmalab.train.recipes.gkd import Teacher, _prepare, _seed, sample_completions

    cfg, model, teacher, tok, batch = parts(setup, raw_config(setup, tmp_path, lmbda=1.0))
    model.eval()
    prepared = _prepare(cfg, Teacher(teacher, [], tok.bos_id), tok, rank=0)(model, dict(batch), 3, 1)
    assert prepared["on_policy"].all()
    for b in range(batch["input_ids"].shape[0]):
        p = int(batch["prompt_len"][b])
        prompt = batch["input_ids"][b, :p].tolist()
        assert prepared["input_ids"][b, :p].tolist() == prompt  # the prompt stays
        (sample,) = sample_completions(model, [prompt], max_new_tokens=12, temperature=1.0, top_k=0,
                                       top_p=1.0, stop_ids=list(tok.stop_ids), seed=_seed(0, 3, 1, 1) + b)
        row = prepared["input_ids"][b, p:p + len(sample)].tolist()
        assert row == sample  # the student's own sample, reproducible from its row seed
        targets = prepared["targets"][b]
        assert targets[:p - 1].eq(-100).all() and targets[p - 1:p - 1 + len(sample)].tolist() == sample
        assert targets[p - 1 + len(sample):].eq(-100).all()
    assert not prepared["teacher_hidden"].requires_grad  # no gradient through sampling or the teacher
    assert (prepared["input_ids"] != batch["input_ids"]).any()  # not the dataset's answers


def test_context_distillation_teacher_equals_the_prefixed_sequence(setup, tmp_path):
    """Both teachers with a few-shot prefix: another model (the prefix prepended to every row) and the
    student's own base with its adapter off (the prefix KV computed once, train.roles), each equal to
    running <bos> prefix row through that model."""
    from gemmalab.train.recipes.gkd import Teacher, _with_prefix, teacher_hidden
    from gemmalab.train.roles import Roles

    cfg, model, teacher, tok, batch = parts(setup, raw_config(setup, tmp_path, **{}) | {"lora": {"rank": 4}})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)  # a nonzero adapter, so "adapter off" is a real switch
    prefix = tok.encode("hello world. hello", add_bos=False)
    roles = Roles(model)
    base_teacher = Teacher(model, prefix, tok.bos_id, roles)
    got_other = teacher_hidden(teacher, batch, prefix)
    got_base = base_teacher.hidden(batch)
    for b in range(batch["input_ids"].shape[0]):
        L = int((batch["positions"][b] >= 0).sum())
        ids = torch.tensor([_with_prefix(batch["input_ids"][b, :L].tolist(), prefix)])
        with torch.no_grad():
            full = teacher.hidden_states(ids, torch.arange(ids.shape[1])[None])[0]
            with roles.use("reference"):
                base = model.hidden_states(ids, torch.arange(ids.shape[1])[None])[0]
            policy = model.hidden_states(ids, torch.arange(ids.shape[1])[None])[0]
        torch.testing.assert_close(got_other[b, :L], torch.cat([full[:1], full[1 + len(prefix):]]),
                                   rtol=1e-5, atol=1e-5)
        # position 0 (<bos>) predicts a prompt token: never a target, left at zero
        torch.testing.assert_close(got_base[b, 1:L], base[1 + len(prefix):], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(base[1 + len(prefix):], policy[1 + len(prefix):], atol=1e-3)


@pytest.mark.parametrize("divergence", ["jsd", "rkl", "fy"])
def test_each_divergence_lowers_its_loss(setup, tmp_path, divergence):
    from gemmalab.train.recipes.gkd import train_gkd

    raw = raw_config(setup, tmp_path / divergence, steps=24, lmbda=0.0, divergence=divergence)
    raw["optim"]["lr"] = 3e-2
    raw["run"]["log_every"] = 1
    train_gkd(cfg_of(raw), progress=False)
    rows = [json.loads(x) for x in (tmp_path / divergence / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:4]) / 4, sum(r["loss"] for r in rows[-4:]) / 4
    assert all(r["loss"] >= 0 for r in rows) and last < 0.8 * first


RUNNER = """
import json, sys
from gemmalab.train.config import build_config
from gemmalab.train.recipes.gkd import GKDConfig, check_gkd_config, train_gkd
cfg = check_gkd_config(build_config(json.loads(sys.argv[1]), GKDConfig))
train_gkd(cfg, resume=sys.argv[2] == "1", progress=False)
"""


@pytest.mark.parametrize("exact_rows", [True, False])
def test_sigkill_then_resume_is_exact(setup, tmp_path, exact_rows):
    """Also with the micro-batch decoded in one forward (gkd.exact_rows = false): a resumed run sees
    the same micro-batches, so it draws the same samples."""
    raws = [raw_config(setup, tmp_path / out, steps=12, lmbda=0.5, exact_rows=exact_rows) for out in ("a", "b")]
    kill_and_resume(RUNNER, *raws, ENV, kill_after=4)
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert {r["on_policy"] for r in rows} == {0.0, 1.0}  # both kinds of micro-batch occurred


@pytest.mark.slow
def test_torchrun_two_processes_match_one(setup, tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    results = {}
    for n in (1, 2):
        out = tmp_path / f"w{n}"
        raw = raw_config(setup, out, steps=4, lmbda=0.5)
        raw["run"]["log_every"] = 2
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(script), json.dumps(raw), "0"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        latest = (out / "checkpoints" / "latest").read_text().strip()
        results[n] = ([r["loss"] for r in rows], load_file(str(out / "checkpoints" / latest / "model.safetensors")))
    (l1, w1), (l2, w2) = results[1], results[2]
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=1e-6)
    for k in w1:  # see test_distill_train's torchrun test for the tolerance
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-4)


def test_config_errors(setup, tmp_path):
    for bad, msg in [({"lmbda": 1.5}, "gkd.lmbda is a probability"),
                     ({"divergence": "kl"}, "gkd.divergence must be one of"),
                     ({"max_new_tokens": 40}, "leaves no room for a prompt"),
                     ({"alpha": 0.5}, "gkd.alpha must be >= 1")]:
        with pytest.raises(ConfigError, match=msg):
            cfg_of(raw_config(setup, tmp_path, **bad))


def test_cli_runs_gkd(setup, tmp_path):
    cfg = tmp_path / "gkd.json"
    cfg.write_text(json.dumps(raw_config(setup, tmp_path / "cli", steps=2, lmbda=1.0)))
    out = subprocess.run([sys.executable, "-m", "gemmalab", "train", "gkd", str(cfg), "--no-progress"],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step 2: loss" in out.stdout and "lmbda=1.0 on-policy" in out.stderr


def test_native_lora_sampler_and_base_teacher(setup, tmp_path):
    """Context distillation on one base: the student is the checkpoint + LoRA, the teacher its own base
    with the adapter off after a prefix, the on-policy samples drawn from the native-quantized copy
    sharing the adapter's tensors; the sampler / learner KL is logged every on-policy step."""
    from gemmalab.train.recipes.gkd import train_gkd

    raw = raw_config(setup, tmp_path / "native", steps=3, lmbda=1.0, sampler="native", teacher="base",
                     teacher_prefix="hello world. hello world.")
    raw["model"] = {"path": str(setup / "teacher.gguf")}
    raw["lora"] = {"rank": 4}
    raw["optim"]["lr"] = 5e-2
    train_gkd(cfg_of(raw), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "native" / "metrics.jsonl").read_text().splitlines()]
    assert [r["on_policy"] for r in rows] == [1.0, 1.0, 1.0]
    # int8 activations of the quantized base vs the fp32 learner: small, nonzero, finite
    assert all(0 < r["sampler_kl"] < 0.05 for r in rows), [r["sampler_kl"] for r in rows]
    with pytest.raises(ConfigError, match="the student's base with its adapter off"):
        cfg_of(raw | {"lora": {"rank": 0}})
    with pytest.raises(ConfigError, match="sampler = 'native' samples from the GGUF"):
        cfg_of(raw | {"lora": {"rank": 0}, "gkd": dict(raw["gkd"], teacher=str(setup / "teacher.gguf"))})
