"""Reward models: the Bradley-Terry loss and calibration metrics against hand-computed values, the
scalar head on the last real token, and `gemmalab train rm` on a tiny model (learns an easy
preference, checkpoints, resumes bitwise, shares its init across data seeds, refuses bad configs
before any step), `gemmalab reward score` and the Reward-protocol term."""
import json
import math
import random

import pytest
import torch

from gemmalab.train.config import ConfigError, build_config

from .synthetic import write_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"preset": "tiny", "arch": {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}}


def write_pairs(path, n, seed, flip=0.0):
    """Chosen completions are digits 5-9, rejected ones digits 0-4: an easy, learnable preference."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            good = "".join(rng.choice("56789") for _ in range(rng.randint(2, 3)))
            bad = "".join(rng.choice("01234") for _ in range(rng.randint(2, 3)))
            flipped = rng.random() < flip
            if flipped:
                good, bad = bad, good
            f.write(json.dumps({"prompt": f"{rng.randint(10, 99)}+{rng.randint(10, 99)}", "chosen": good,
                                "rejected": bad, "flipped": flipped}) + "\n")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    write_tokenizer(root / "tok.gguf")
    write_pairs(root / "train.jsonl", 160, 0, flip=0.1)
    write_pairs(root / "eval.jsonl", 48, 1)
    return root


def raw_config(root, out, steps=16, **rm):
    return {"model": dict(TINY, tokenizer=str(root / "tok.gguf")),
            "data": {"train": [str(root / "train.jsonl")], "eval": [str(root / "eval.jsonl")], "seq_len": 32,
                     "batch_size": 8},
            "optim": {"lr": 1e-2, "warmup_steps": 2}, "lora": {"rank": 4},
            "run": {"out_dir": str(out), "steps": steps, "log_every": 1, "save_every": 4, "threads": 1},
            "rm": {"eval_every": 8, **rm}}


def cfg_of(raw):
    from gemmalab.train.recipes.rm import RMConfig, check_rm_config
    return check_rm_config(build_config(raw, RMConfig))


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    from safetensors.torch import load_file
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return load_file(str(out / "checkpoints" / latest / "model.safetensors"))


@pytest.fixture(scope="module")
def run_a(root):
    from gemmalab.train.recipes.rm import train_rm
    out = root / "a"
    last = train_rm(cfg_of(raw_config(root, out)), progress=False)
    return out, last


# ---------------------------------------------------------------------------------------------------
# The loss and the metrics

def test_bt_loss_hand_computed_values():
    from gemmalab.train.losses import bt_loss

    one, zero = torch.tensor([1.0]), torch.tensor([0.0])
    assert math.isclose(float(bt_loss(one, zero)), math.log(1 + math.exp(-1)), rel_tol=1e-6)
    assert math.isclose(float(bt_loss(zero, one)), math.log(1 + math.e), rel_tol=1e-6)
    # a margin is subtracted from the difference (TRL / Llama 2): -log sigmoid(1 - 0.5)
    assert math.isclose(float(bt_loss(one, zero, margin=torch.tensor([0.5]))), math.log(1 + math.exp(-0.5)),
                        rel_tol=1e-6)
    # centering: + c (r_c + r_r)^2 (TRL's center_rewards_coefficient)
    got = bt_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), center_coef=0.1, reduction="none")
    want = torch.tensor([math.log(1 + math.exp(-1)) + 0.1 * 1.0, math.log(1 + math.exp(-1)) + 0.1 * 9.0])
    torch.testing.assert_close(got, want)
    assert math.isclose(float(bt_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), reduction="mean")),
                        math.log(1 + math.exp(-1)), rel_tol=1e-6)
    # stable far out: -log sigmoid(-200) = 200, with a finite gradient
    r = torch.tensor([-100.0], requires_grad=True)
    loss = bt_loss(r, torch.tensor([100.0]))
    loss.backward()
    assert math.isclose(float(loss.detach()), 200.0, rel_tol=1e-6) and torch.isfinite(r.grad).all()
    with pytest.raises(ValueError, match="reduction"):
        bt_loss(one, zero, reduction="max")


def test_preference_metrics_accuracy_and_ece():
    from gemmalab.train.losses import expected_calibration_error, preference_metrics

    # sigmoid(d) = 0.8 on every pair and every pair right: |1 - 0.8| = 0.2
    d = math.log(4)
    m = preference_metrics(torch.full((10,), d, dtype=torch.float64), torch.zeros(10, dtype=torch.float64))
    assert m["accuracy"] == 1.0 and math.isclose(m["ece"], 0.2, rel_tol=1e-9)
    assert math.isclose(m["loss"], -math.log(0.8), rel_tol=1e-9)
    # confidence 0.85 on 20 pairs, 17 right (3 predicted the wrong way): perfectly calibrated
    p = torch.tensor([0.85] * 17 + [0.15] * 3, dtype=torch.float64)
    assert math.isclose(expected_calibration_error(p), 0.0, abs_tol=1e-12)
    # two bins: 0.95 (4 pairs, all right: gap 0.05) and 0.65 (4 pairs, 2 right: gap 0.15) -> 0.1
    p = torch.tensor([0.95] * 4 + [0.65, 0.65, 0.35, 0.35], dtype=torch.float64)
    assert math.isclose(expected_calibration_error(p), 0.5 * 0.05 + 0.5 * 0.15, rel_tol=1e-9)
    # flipped labels: agreement with the corrupted label is reported apart
    m = preference_metrics(torch.tensor([1.0, 1.0, -1.0]), torch.zeros(3), torch.tensor([False, False, True]))
    assert m["accuracy_clean"] == 1.0 and m["accuracy_flipped"] == 0.0


def test_head_reads_the_last_real_token_and_padding_does_not_matter(root):
    from gemmalab.train.recipes.rm import build_reward_model
    from gemmalab.train.rewards.model import rows_batch

    model, tok, _ = build_reward_model(cfg_of(raw_config(root, root / "x")), torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    model.eval()
    seqs = [[2, 10, 11, 12, 13], [2, 14, 15], [2, 16, 17, 18, 19, 20, 21]]
    b = rows_batch(seqs, tok.pad_id)
    with torch.no_grad():
        got = model.scores(b["input_ids"], b["positions"], b["segment_ids"], b["last_index"])
        for i, s in enumerate(seqs):
            ids = torch.tensor([s])
            h = model.backbone.hidden_states(ids, torch.arange(len(s))[None])[0, -1]
            torch.testing.assert_close(got[i], (h @ model.head.weight[0]), rtol=1e-5, atol=1e-6)


def test_shared_init_does_not_depend_on_the_data_seed(root):
    """WARM members share their init: rm.init_seed fixes the preset's weights, LoRA A (B = 0) and the
    head; run.seed (the data order) does not touch them."""
    from gemmalab.train.recipes.rm import build_reward_model

    def init(**run):
        raw = raw_config(root, root / "x")
        raw["run"].update(run.pop("run", {}))
        raw["rm"].update(run)
        model, _, meta = build_reward_model(cfg_of(raw), torch.device("cpu"))
        return {k: v.clone() for k, v in model.state_dict().items()}, meta

    a, meta_a = init()
    b, meta_b = init(run={"seed": 7})
    c, meta_c = init(init_seed=1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a["base_hash"] == meta_b["base_hash"] != meta_c["base_hash"]  # a preset's base is the seed's
    assert all(not v.any() for k, v in a.items() if k.endswith("lora_b"))
    assert not torch.equal(a["head.weight"], c["head.weight"])
    assert not torch.equal(a["backbone.layers.0.self_attn.q_proj.lora_a"],
                           c["backbone.layers.0.self_attn.q_proj.lora_a"])


# ---------------------------------------------------------------------------------------------------
# Training

def test_train_rm_learns_the_preference_and_saves_a_reward_model(run_a, root):
    from gemmalab.train.rewards.model import load_reward_model, read_reward_model

    out, last = run_a
    r = rows(out)
    assert [x["step"] for x in r] == list(range(1, 17))
    assert sum(x["loss"] for x in r[-4:]) / 4 < 0.5 * r[0]["loss"]
    evals = [x for x in r if "eval_accuracy" in x]
    assert [x["step"] for x in evals] == [8, 16]
    assert last["eval_accuracy"] >= 0.9 and 0 <= last["eval_ece"] < 0.5 and last["eval_loss"] < math.log(2)
    meta, tensors = read_reward_model(out / "final")
    assert meta["trainable"] == "lora" and meta["lora"]["rank"] == 4 and len(meta["base_hash"]) == 64
    assert "head.weight" in tensors and all(".lora_" in k or k == "head.weight" for k in tensors)
    # the final RM and the last checkpoint hold the same trained tensors
    ck = weights(out)
    assert all(torch.equal(ck[k], tensors[k]) for k in tensors)
    model, tok, _ = load_reward_model(out, "cpu")  # the run directory resolves to final/
    assert not any(p.requires_grad for p in model.parameters())


def test_resume_after_a_stop_equals_the_uninterrupted_run(run_a, root, monkeypatch):
    import gemmalab.train.trainer as trainer
    from gemmalab.train.recipes.rm import train_rm

    out = root / "c"
    real_save = trainer.ckpt.save

    class Stop(Exception):
        pass

    def save_then_stop(out_dir, step, *a, **k):
        path = real_save(out_dir, step, *a, **k)
        if step == 8:
            raise Stop  # the process dies right after step 8's checkpoint
        return path

    monkeypatch.setattr(trainer.ckpt, "save", save_then_stop)
    with pytest.raises(Stop):
        train_rm(cfg_of(raw_config(root, out)), progress=False)
    monkeypatch.setattr(trainer.ckpt, "save", real_save)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000008"
    train_rm(cfg_of(raw_config(root, out)), resume=True, progress=False)
    wa, wc = weights(run_a[0]), weights(out)
    assert wa.keys() == wc.keys() and all(torch.equal(wa[k], wc[k]) for k in wa)  # bitwise on CPU
    ra, rc = rows(run_a[0]), rows(out)
    assert [x["loss"] for x in ra] == [x["loss"] for x in rc]
    assert [x.get("eval_accuracy") for x in ra] == [x.get("eval_accuracy") for x in rc]


def test_top_blocks_trains_the_top_blocks_norm_and_head_only(root):
    from gemmalab.train.recipes.rm import train_rm
    from gemmalab.train.rewards.model import read_reward_model

    out = root / "top"
    train_rm(cfg_of(raw_config(root, out, steps=4, trainable="top_blocks", top_blocks=1, eval_every=0)),
             progress=False)
    meta, tensors = read_reward_model(out)
    assert meta["trainable"] == "top_blocks" and meta["top_blocks"] == 1
    assert sorted({k.split(".")[2] for k in tensors if k.startswith("backbone.layers.")}) == ["1"]
    assert "backbone.norm.weight" in tensors and "head.weight" in tensors
    assert not any(".lora_" in k for k in tensors)
    # rm.init_head: a linear probe's head starts another run
    probe = root / "probe"
    train_rm(cfg_of(raw_config(root, probe, steps=2, trainable="head", eval_every=0)), progress=False)
    from gemmalab.train.recipes.rm import build_reward_model
    model, _, _ = build_reward_model(cfg_of(raw_config(root, root / "x", init_head=str(probe))), torch.device("cpu"))
    torch.testing.assert_close(model.head.weight.detach(), read_reward_model(probe)[1]["head.weight"], rtol=0, atol=0)


def test_bad_configs_are_one_clear_error_before_any_step(root, tmp_path, capsys):
    from gemmalab.cli import main
    from gemmalab.train.recipes.rm import train_rm

    cases = [({"rm": {"trainable": "all"}}, "rm.trainable must be one of"),
             ({"data": {"train": [str(tmp_path / "missing.jsonl")]}}, "data.train: .*missing.jsonl: no such file"),
             ({"lora": {"rank": 0}}, "set lora.rank >= 1"),
             ({"data": {"eval": []}}, "rm.eval_every evaluates on held-out pairs"),
             ({"rm": {"template": "html"}}, "rm.template must be one of")]
    for change, msg in cases:
        raw = raw_config(root, tmp_path / "bad")
        for section, values in change.items():
            raw[section].update(values)
        with pytest.raises(ConfigError, match=msg):
            cfg_of(raw)
    raw = raw_config(root, tmp_path / "bad", trainable="top_blocks", top_blocks=5)
    with pytest.raises(ConfigError, match="rm.top_blocks = 5, but the model has 2 blocks"):
        train_rm(cfg_of(raw), progress=False)
    # through the CLI: one line, exit status 1, nothing trained
    raw = raw_config(root, tmp_path / "bad", trainable="everything")
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    assert main(["train", "rm", str(tmp_path / "bad.json"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gemmalab: error: rm.trainable must be one of 'lora', 'top_blocks', 'head', not 'everything'"]
    assert not (tmp_path / "bad" / "checkpoints").exists()
    bad_pairs = tmp_path / "bad_pairs.jsonl"
    bad_pairs.write_text('{"prompt": "1+1", "chosen": "2"}\n')
    raw = raw_config(root, tmp_path / "bad")
    raw["data"]["train"] = [str(bad_pairs)]
    from gemmalab.train.data import DataError
    with pytest.raises(DataError, match=r"bad_pairs.jsonl:1: a preference pair needs a string 'rejected'"):
        train_rm(cfg_of(raw), progress=False)
    assert not (tmp_path / "bad" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------------
# The CLI and the reward term

def test_cli_train_rm_then_reward_score(run_a, root, tmp_path, capsys):
    from gemmalab.cli import main
    from gemmalab.train.rewards import Problem, Reward
    from gemmalab.train.rewards.model import RewardModelTerm

    cfg = tmp_path / "rm.json"
    cfg.write_text(json.dumps(raw_config(root, tmp_path / "cli", steps=4, eval_every=0)))
    assert main(["train", "rm", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "step 4: loss" in out and "eval_accuracy" in out and "eval_ece" in out

    assert main(["reward", "score", str(run_a[0]), str(root / "eval.jsonl"), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["pairs"] == 48
    assert math.isclose(m["accuracy"], run_a[1]["eval_accuracy"], abs_tol=1e-9)
    assert math.isclose(m["ece"], run_a[1]["eval_ece"], rel_tol=1e-4, abs_tol=1e-6)
    assert main(["reward", "score", str(run_a[0]), str(root / "train.jsonl")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("160 pairs: accuracy") and "flipped labels: agreement" in text

    comp = tmp_path / "completions.jsonl"
    comp.write_text("".join(json.dumps({"prompt": "12+34", "completion": c}) + "\n" for c in ("987", "012")))
    assert main(["reward", "score", str(run_a[0] / "final"), str(comp)]) == 0
    scored = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [s["completion"] for s in scored] == ["987", "012"] and scored[0]["score"] > scored[1]["score"]

    term = RewardModelTerm(run_a[0], batch_size=1)
    assert isinstance(term, Reward)
    problems = [Problem(id=f"p{i}", prompt="12+34", family="synthetic") for i in range(3)]
    res = term(problems, ["987", "012", "\ud800"])
    assert [r.status for r in res] == ["ok", "ok", "error"] and res[2].value is None
    assert math.isclose(res[0].value, scored[0]["score"], rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(res[1].value, scored[1]["score"], rel_tol=1e-5, abs_tol=1e-6)

    assert main(["reward", "score", str(tmp_path / "nowhere"), str(comp)]) == 1
    assert "no such reward model" in capsys.readouterr().err


def test_truncation_keeps_the_turn_markers_and_the_scored_token(root):
    """A row longer than seq_len loses the start of the prompt's text, never <bos>, the chat turn
    markers or the completion's last token (what the head reads)."""
    from gemmalab.tokenizer import Tokenizer
    from gemmalab.train.rewards.model import encode

    tok = Tokenizer.from_gguf(root / "tok.gguf")
    prompt, answer = "a long prompt " * 5, "ok answer"
    full = encode(tok, prompt, answer, "chat", 1000)
    for n in (len(full) - 5, 20):
        ids = encode(tok, prompt, answer, "chat", n)
        text = tok.decode(ids)
        assert len(ids) == n and ids[-1] == full[-1]
        assert text.startswith("<bos><start_of_turn>user\n")
        assert text.endswith("<end_of_turn>\n<start_of_turn>model\nok answer<end_of_turn>")
    ids = encode(tok, prompt, answer, "chat", 12)  # the completion alone does not fit: its start goes
    assert len(ids) == 12 and tok.decode(ids).startswith("<bos><start_of_turn>user\n<end_of_turn>")
    assert ids[-1] == full[-1]
