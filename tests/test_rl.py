"""`gemmalab train rl` (RLOO / REINFORCE) on tiny models rewarded by a real tiny reward model, and one
step of the real 270M rewarded by sandboxed unit tests.

- the policy learns what the reward model prefers; a KL coefficient keeps it closer to the reference;
- the loss's gradient is -sum_i A_i grad log pi(y_i) / n with RLOO's leave-one-out advantages of
  r_i - beta * k1_i (computed by hand from the batch);
- the "exact" and "k3_loss" KL variants and REINFORCE run and log;
- SIGKILL + --resume is bitwise equal to an uninterrupted run, and the resumed run scores no sample
  twice (RUN_DIR/rewards.jsonl);
- bad reward configs are one clear error before any model is built;
- torchrun with 2 processes equals 1 (slow).
"""
import json
import subprocess
import sys

import pytest
import torch

from gemmalab.train.config import ConfigError, build_config

from .distill_helpers import kill_and_resume
from .synthetic import write_tokenizer
from .test_distill_train import ENV
from .test_reward_model import cfg_of as rm_cfg_of, raw_config as rm_raw_config, write_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"preset": "tiny", "arch": {"vocab_size": 291, "num_hidden_layers": 2,
                                   "layer_types": ["sliding_attention", "full_attention"]}}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tokenizer and a tiny reward model that prefers high digits (tests/test_reward_model.py)."""
    from gemmalab.train.recipes.rm import train_rm

    root = tmp_path_factory.mktemp("rl")
    write_tokenizer(root / "tok.gguf")
    write_pairs(root / "train.jsonl", 160, 0, flip=0.1)
    write_pairs(root / "eval.jsonl", 48, 1)
    train_rm(rm_cfg_of(rm_raw_config(root, root / "rm")), progress=False)
    return root


def raw_config(root, out, steps=16, beta=0.0, **sections):
    raw = {"model": dict(TINY, tokenizer=str(root / "tok.gguf")), "data": {"batch_size": 4, "seq_len": 32},
           "optim": {"lr": 1e-2, "warmup_steps": 1}, "lora": {"rank": 0},
           "run": {"out_dir": str(out), "steps": steps, "log_every": 1, "save_every": 4, "threads": 1},
           "tasks": {"family": "add", "train": 32, "heldout": 8},
           "rollout": {"num_generations": 4, "max_new_tokens": 4},
           "reward": {"terms": [{"kind": "rm", "path": str(root / "rm")}]},
           "algo": {"beta": beta}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    return raw


def cfg_of(raw):
    from gemmalab.train.recipes.rl import RLConfig, check_rl_config
    return check_rl_config(build_config(raw, RLConfig))


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_policy_learns_the_reward_models_preference_and_kl_holds_it_back(root, tmp_path):
    from gemmalab.train.recipes.rl import train_rl

    train_rl(cfg_of(raw_config(root, tmp_path / "free", beta=0.0)), progress=False)
    free = rows(tmp_path / "free")
    first, last = [r["reward"] for r in free[:3]], [r["reward"] for r in free[-3:]]
    assert sum(last) / 3 > sum(first) / 3 + 0.5, [round(r["reward"], 3) for r in free]
    assert all(r["unscored"] == 0 for r in free) and all(r["completion_len"] > 0 for r in free)
    train_rl(cfg_of(raw_config(root, tmp_path / "held", beta=2.0)), progress=False)
    held = rows(tmp_path / "held")
    kl = lambda rs: sum(r["kl"] for r in rs[-4:]) / 4
    assert kl(held) < 0.5 * kl(free), (kl(held), kl(free))


def test_loss_gradient_is_the_rloo_estimator_by_hand(root, tmp_path):
    from gemmalab.generate import SamplingParams
    from gemmalab.train.build import build_model_and_tokenizer
    from gemmalab.train.losses import token_logprobs
    from gemmalab.train.recipes.rl import _prepare, build_terms, PersistentRewardCache, rl_loss
    from gemmalab.train.rewards import tasks
    from gemmalab.train.roles import Roles

    cfg = cfg_of(raw_config(root, tmp_path / "g", beta=0.3))
    model, tok = build_model_and_tokenizer(cfg, torch.device("cpu"))
    with torch.no_grad():  # move the policy away from the reference so the KL is not 0
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    roles = Roles(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.sub_(0.01 * torch.ones_like(p))  # the reference snapshot was taken before this
    problems = tasks.make_problems("add", 4, 0)
    ids = [tok.encode(p.prompt) for p in problems]
    prep = _prepare(cfg, problems, ids, tok, build_terms(cfg), PersistentRewardCache(None, False), rank=0)
    model.eval()
    with torch.no_grad():
        batch = prep(model, {"problem_index": torch.arange(4), "input_ids": torch.zeros(4, 1)}, 0, 0)
    model.train()
    n = float(batch["valid"].sum())
    loss, metrics = rl_loss(model, batch, n, cfg, roles)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # by hand: R_i = r_i - beta * sum_t (log pi - log ref), A_i = R_i - mean of the others
    mask = batch["targets"] != -100
    h = model.hidden_states(batch["input_ids"], batch["positions"], segment_ids=batch["segment_ids"])
    lp = token_logprobs(h, model.embed_tokens.weight, batch["targets"])
    with torch.no_grad(), roles.use("reference"):
        hr = model.hidden_states(batch["input_ids"], batch["positions"], segment_ids=batch["segment_ids"])
        ref = token_logprobs(hr, model.embed_tokens.weight, batch["targets"])
    seq_lp = (lp * mask).sum(1)
    kl = (seq_lp.detach() - (ref * mask).sum(1)).double()
    assert kl.abs().max() > 1e-3
    R = (batch["reward"] - 0.3 * kl).view(4, 4)
    A = (R - (R.sum(1, keepdim=True) - R) / 3).view(-1)
    (-(A.float() * seq_lp).sum() / n).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    assert metrics["kl"] == pytest.approx(float(kl.sum() / n), rel=1e-5)


@pytest.mark.parametrize("algo", [{"kl": "exact", "beta": 0.5}, {"kl": "k3_loss", "beta": 0.5},
                                  {"name": "reinforce", "baseline": "batch_mean"}])
def test_kl_variants_and_reinforce_train(root, tmp_path, algo):
    from gemmalab.train.recipes.rl import train_rl

    last = train_rl(cfg_of(raw_config(root, tmp_path / "v", steps=3, algo=algo)), progress=False)
    assert last["step"] == 3 and all(k in last for k in ("reward", "kl", "kl_k3", "rm"))
    assert torch.isfinite(torch.tensor([last["loss"], last["kl"]])).all()


RUNNER = """
import json, sys
from gemmalab.train.config import build_config
from gemmalab.train.recipes.rl import RLConfig, check_rl_config, train_rl
cfg = check_rl_config(build_config(json.loads(sys.argv[1]), RLConfig))
train_rl(cfg, resume=sys.argv[2] == "1", progress=False)
"""


def test_sigkill_then_resume_is_exact_and_rescores_nothing(root, tmp_path):
    raws = [raw_config(root, tmp_path / out, steps=12) for out in ("a", "b")]
    for raw in raws:
        raw["run"]["save_every"] = 3
    kill_and_resume(RUNNER, *raws, ENV, kill_after=4)
    keys = {}
    for out in ("a", "b"):
        lines = (tmp_path / out / "rewards.jsonl").read_text().splitlines()
        keys[out] = [json.loads(x)[0] for x in lines if x.strip()]
    # every (term, problem, completion) scored once, in the killed-and-resumed run too
    assert len(keys["b"]) == len(set(keys["b"])) and set(keys["b"]) == set(keys["a"])


def test_bad_configs_are_one_clear_error(root, tmp_path):
    rm = str(root / "rm")
    for terms, msg in [([{"kind": "bleu"}], "kind must be one of"),
                       ([{"kind": "rm"}], "kind 'rm' needs `path`"),
                       ([{"kind": "rm", "path": str(tmp_path / "none")}], "kind 'rm' needs `path`"),
                       ([{"kind": "rm", "path": rm, "weight": "heavy"}], "weight must be a number"),
                       ([{"kind": "rm", "path": rm, "transform": "inada", "tau": -1.0}], "above the floor"),
                       ([{"kind": "answer", "metrik": "exact"}], "unknown key"),
                       ("rm", "list of tables")]:
        raw = raw_config(root, tmp_path / "x")
        raw["reward"]["terms"] = terms
        with pytest.raises(ConfigError, match=msg):
            cfg_of(raw)
    for section, msg in [({"algo": {"name": "ppo"}}, "algo.name must be one of"),
                         ({"rollout": {"num_generations": 1}}, "needs rollout.num_generations >= 2"),
                         ({"tasks": {"family": "poetry"}}, "tasks.family must be one of"),
                         ({"rollout": {"sampler": "native"}}, "set lora.rank > 0")]:
        with pytest.raises(ConfigError, match=msg):
            cfg_of(raw_config(root, tmp_path / "x", **section))
    assert not (tmp_path / "x").exists()  # refused before any run directory was made


def test_cli_runs_rl(root, tmp_path):
    cfg = tmp_path / "rl.json"
    cfg.write_text(json.dumps(raw_config(root, tmp_path / "cli", steps=2)))
    out = subprocess.run([sys.executable, "-m", "gemmalab", "train", "rl", str(cfg), "--no-progress"],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step 2: reward" in out.stdout and "rloo (beta=0.0, kl=k1)" in out.stderr


@pytest.mark.slow
def test_torchrun_two_processes_match_one(root, tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    results = {}
    for n in (1, 2):
        out = tmp_path / f"w{n}"
        raw = raw_config(root, out, steps=3, beta=0.1)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(script), json.dumps(raw), "0"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        latest = (out / "checkpoints" / "latest").read_text().strip()
        results[n] = ([r["loss"] for r in rows(out)], [r["reward"] for r in rows(out)],
                      load_file(str(out / "checkpoints" / latest / "model.safetensors")))
    (l1, r1, w1), (l2, r2, w2) = results[1], results[2]
    assert r1 == pytest.approx(r2, rel=1e-5, abs=1e-6)  # the same samples, the same rewards
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-4, atol=1e-6)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_real_270m_rloo_step_on_sandboxed_code_tests(tmp_path):
    """The embedded 270M + LoRA, native sampler, function-writing problems scored by their unit tests
    in the sandbox: two steps run, every sample is scored, the sampler / learner KL is small."""
    from gemmalab.train.recipes.rl import train_rl

    raw = {"data": {"batch_size": 2, "seq_len": 160}, "lora": {"rank": 4},
           "run": {"out_dir": str(tmp_path / "real"), "steps": 2, "log_every": 1, "save_every": 2},
           "tasks": {"family": "code", "train": 8, "heldout": 4, "options": {"few_shot": 1}},
           "rollout": {"num_generations": 2, "max_new_tokens": 24, "sampler": "native"},
           "eval": {"every": 2, "problems": 2}}
    last = train_rl(cfg_of(raw), progress=False)
    r = rows(tmp_path / "real")
    assert [x["step"] for x in r] == [1, 2]
    assert all(x["unscored"] == 0 for x in r)
    assert all(0.0 <= x["code_tests"] <= 1.0 for x in r)
    assert all(0 < x["sampler_kl"] < 1.0 for x in r), [x["sampler_kl"] for x in r]
    assert 0.0 <= last["eval_reward"] <= 1.0 and "eval_exact" in last
