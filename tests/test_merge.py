"""Weight averaging (WARM, Rame et al. 2024): averaging identical models is the identity, the average
of linear reward models is their ensemble exactly, LoRA updates merged into one concatenated-rank
adapter equal the dense average (and averaging the factors does not), mismatched members are refused
with one clear error, and `gemmalab merge average` / `gemmalab reward score` on tiny `train rm` runs."""
import json
import re

import pytest
import torch

from gemmalab.train.averaging import MergeError, average, lora_delta, merge_lora_deltas

from .test_reward_model import cfg_of, raw_config, write_pairs
from .synthetic import write_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def adapter(seed, rank=4, modules=("q", "v"), d_in=12, d_out=10):
    return {**{f"{m}.lora_a": randn(rank, d_in, seed=seed * 10 + i) for i, m in enumerate(modules)},
            **{f"{m}.lora_b": randn(d_out, rank, seed=seed * 10 + 5 + i) for i, m in enumerate(modules)}}


def test_average_of_identical_models_is_the_identity():
    sd = {"w": randn(5, 7, seed=0), "b": randn(7, seed=1), "h": randn(1, 64, seed=2).to(torch.bfloat16)}
    for m in (2, 3, 5):
        got = average([sd] * m)
        assert all(torch.equal(got[k], sd[k]) and got[k].dtype == sd[k].dtype for k in sd)
    got = average([sd, sd], weights=[3, 1])
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_weighted_average_and_bad_weights():
    a, b = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    torch.testing.assert_close(average([a, b])["w"], torch.full((3,), 0.5))
    torch.testing.assert_close(average([a, b], weights=[1, 3])["w"], torch.full((3,), 0.75))  # normalised
    for bad, msg in [([1.0], "1 weights for 2 members"), ([-1.0, 2.0], "must be >= 0"), ([0, 0], "positive sum")]:
        with pytest.raises(MergeError, match=msg):
            average([a, b], weights=bad)


def test_averaging_linear_reward_models_equals_their_ensemble():
    """A model linear in its weights (a head on fixed features; a linear backbone and head) gives,
    averaged, the mean of the members' predictions exactly (WARM's WA = ENS holds to first order in
    general and exactly here)."""
    x = randn(32, 16, seed=3)  # features: the frozen backbone's final hidden states
    heads = [{"head.weight": randn(1, 16, seed=s)} for s in (4, 5, 6)]
    ens = torch.stack([(x @ h["head.weight"].t()).squeeze(-1) for h in heads]).mean(0)
    wa = (x @ average(heads)["head.weight"].t()).squeeze(-1)
    torch.testing.assert_close(wa, ens, rtol=1e-6, atol=1e-6)
    # a linear backbone W and a shared head: r(x) = w . (W x) is linear in W
    w = randn(8, seed=7)
    backbones = [{"W": randn(8, 16, seed=s)} for s in (8, 9)]
    ens = torch.stack([x @ b["W"].t() @ w for b in backbones]).mean(0)
    torch.testing.assert_close(x @ average(backbones)["W"].t() @ w, ens, rtol=1e-5, atol=1e-5)


def test_lora_delta_merge_equals_the_dense_merge_and_factor_averaging_does_not():
    members = [adapter(s) for s in (1, 2, 3)]
    scales, c = [2.0, 2.0, 0.5], [0.5, 0.3, 0.2]
    merged, scale = merge_lora_deltas(members, c, scales=scales)
    assert scale == 2.0 and merged["q.lora_a"].shape == (12, 12) and merged["q.lora_b"].shape == (10, 12)
    for m in ("q", "v"):
        dense = sum(ci * lora_delta(sd[f"{m}.lora_a"], sd[f"{m}.lora_b"], s)
                    for ci, sd, s in zip(c, members, scales))
        got = lora_delta(merged[f"{m}.lora_a"], merged[f"{m}.lora_b"], scale)
        torch.testing.assert_close(got.double(), dense.double(), rtol=1e-6, atol=1e-6)
    # the same scales: B' = [c1 B1, c2 B2] exactly, A' = [A1; A2]
    two, _ = merge_lora_deltas(members[:2], [0.25, 0.75], scales=[2.0, 2.0])
    assert torch.equal(two["q.lora_a"], torch.cat([members[0]["q.lora_a"], members[1]["q.lora_a"]]))
    assert torch.equal(two["q.lora_b"], torch.cat([members[0]["q.lora_b"] * 0.25, members[1]["q.lora_b"] * 0.75], 1))
    # averaging A and B separately: (sum c_i B_i)(sum c_j A_j) has c_i^2 diagonals and cross terms
    naive = average(members[:2])
    wrong = lora_delta(naive["q.lora_a"], naive["q.lora_b"], 2.0)
    right = 0.5 * (lora_delta(members[0]["q.lora_a"], members[0]["q.lora_b"], 2.0)
                   + lora_delta(members[1]["q.lora_a"], members[1]["q.lora_b"], 2.0))
    assert (wrong - right).abs().max() > 0.1 * right.abs().max()


def test_merge_refuses_other_shapes_keys_and_bases():
    a = adapter(1)
    with pytest.raises(MergeError, match=r"member 1: q.lora_a is \(8, 12\), in member 0 \(4, 12\)"):
        merge_lora_deltas([a, adapter(2, rank=8)])
    with pytest.raises(MergeError, match="member 1 holds other tensors than member 0: missing .*v.lora_a"):
        merge_lora_deltas([a, adapter(2, modules=("q", "k"))])
    with pytest.raises(MergeError, match="member 1 was trained on another base than member 0"):
        merge_lora_deltas([a, adapter(2)], bases=["abc", "def"])
    with pytest.raises(MergeError, match="run-b was trained on another base than run-a"):
        average([{"w": torch.zeros(2)}] * 2, bases=["abc", "def"], names=["run-a", "run-b"])
    with pytest.raises(MergeError, match="not LoRA factors"):
        merge_lora_deltas([{**a, "head.weight": torch.zeros(1, 3)}] * 2)


# ---------------------------------------------------------------------------------------------------
# Reward models on disk, and the CLI

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two WARM members: one shared init (rm.init_seed), different data orders and learning rates."""
    from gemmalab.train.recipes.rm import train_rm

    root = tmp_path_factory.mktemp("merge")
    write_tokenizer(root / "tok.gguf")
    write_pairs(root / "train.jsonl", 96, 0)
    write_pairs(root / "eval.jsonl", 32, 1)
    out = {}
    for name, seed, lr in (("m1", 0, 1e-2), ("m2", 1, 5e-3)):
        raw = raw_config(root, root / name, steps=6, eval_every=0)
        raw["run"]["seed"], raw["optim"]["lr"] = seed, lr
        train_rm(cfg_of(raw), progress=False)
        out[name] = root / name
    return root, out


def _scores(path, seqs):
    from gemmalab.train.rewards.model import load_reward_model, score_sequences
    model, tok, meta = load_reward_model(path)
    return score_sequences(model, seqs, tok.pad_id), model, meta


def test_cli_merge_average_of_lora_members_is_the_average_of_their_updates(runs, tmp_path, capsys):
    from gemmalab.cli import main
    from gemmalab.train.lora import lora_modules
    from gemmalab.train.rewards.model import read_reward_model

    root, members = runs
    out = tmp_path / "warm"
    assert main(["merge", "average", str(members["m1"]), str(members["m2"] / "final"), "-o", str(out),
                 "--weights", "1", "3"]) == 0
    assert "the average of 2 reward models (LoRA rank 8 (concatenated) + head)" in capsys.readouterr().out
    meta, tensors = read_reward_model(out)
    assert meta["lora"]["rank"] == 8 and [m["weight"] for m in meta["members"]] == [0.25, 0.75]
    (_, t1), (_, t2) = read_reward_model(members["m1"]), read_reward_model(members["m2"])
    torch.testing.assert_close(tensors["head.weight"], 0.25 * t1["head.weight"] + 0.75 * t2["head.weight"])
    # the loaded merge: base + one rank-8 adapter whose update is the weighted average of the members'
    seqs = [[2, 10, 11, 12], [2, 13, 14, 15, 16, 17]]
    _, model, _ = _scores(out, seqs)
    scale = meta["lora"]["scale"]
    for name, mod in lora_modules(model.backbone).items():
        key = f"backbone.{name}"
        want = sum(c * lora_delta(t[f"{key}.lora_a"], t[f"{key}.lora_b"], scale)
                   for c, t in ((0.25, t1), (0.75, t2)))
        torch.testing.assert_close((mod.lora_b @ mod.lora_a * mod.scale).double(), want.double(), rtol=1e-6, atol=1e-6)

    assert main(["reward", "score", str(out), str(root / "eval.jsonl")]) == 0
    assert capsys.readouterr().out.startswith("32 pairs: accuracy")
    # averaging the same member twice gives that member back (its scores exactly)
    same = tmp_path / "same"
    assert main(["merge", "average", str(members["m1"]), str(members["m1"]), "-o", str(same)]) == 0
    capsys.readouterr()
    torch.testing.assert_close(_scores(same, seqs)[0], _scores(members["m1"], seqs)[0], rtol=1e-6, atol=1e-6)
    assert main(["merge", "average", str(members["m1"]), str(members["m2"]), "-o", str(same)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_head_only_members_average_to_their_ensemble(runs, tmp_path):
    """Linear probes on one frozen backbone: the merged RM's scores are the mean of the members'."""
    from gemmalab.train.recipes.rm import build_reward_model
    from gemmalab.train.rewards.model import average_reward_models, save_reward_model, write_reward_model

    root, _ = runs
    paths = []
    for seed in (0, 1, 2):
        raw = raw_config(root, tmp_path / "x", trainable="head", init_seed=0, head_std=1.0, eval_every=0)
        model, _, meta = build_reward_model(cfg_of(raw), torch.device("cpu"))
        model.head.reset(seed, 1.0)  # three different trained heads
        paths.append(save_reward_model(tmp_path / f"probe{seed}", model, meta))
    meta, tensors = average_reward_models(paths)
    write_reward_model(tmp_path / "wa", meta, tensors)
    seqs = [[2, 10, 11, 12], [2, 13, 14, 15, 16, 17], [2, 18]]
    ens = torch.stack([_scores(p, seqs)[0] for p in paths]).mean(0)
    torch.testing.assert_close(_scores(tmp_path / "wa", seqs)[0], ens, rtol=1e-6, atol=1e-6)


def test_merge_refuses_members_of_another_base_or_kind(runs, tmp_path, capsys):
    from gemmalab.cli import main
    from gemmalab.train.recipes.rm import train_rm

    root, members = runs
    other = tmp_path / "other-base"  # another init seed: another preset base (and adapter init)
    train_rm(cfg_of(raw_config(root, other, steps=1, eval_every=0, init_seed=5)), progress=False)
    capsys.readouterr()
    assert main(["merge", "average", str(members["m1"]), str(other), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained on another base than" in err[0]
    top = tmp_path / "top"
    train_rm(cfg_of(raw_config(root, top, steps=1, eval_every=0, trainable="top_blocks")), progress=False)
    capsys.readouterr()
    assert main(["merge", "average", str(members["m1"]), str(top), "-o", str(tmp_path / "o")]) == 1
    assert "has trainable 'top_blocks'" in capsys.readouterr().err
    rank8 = tmp_path / "rank8"
    raw = raw_config(root, rank8, steps=1, eval_every=0)
    raw["lora"]["rank"] = 8
    train_rm(cfg_of(raw), progress=False)
    capsys.readouterr()
    assert main(["merge", "average", str(members["m1"]), str(rank8), "-o", str(tmp_path / "o")]) == 1
    assert re.search(r"rank8: backbone\..*\.lora_a is \(8, \d+\), in .*m1 \(4, \d+\) \(another model size or "
                     r"LoRA rank\)", capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_cli_merge_average_of_dense_checkpoints(tmp_path, capsys):
    """Runs that are not reward models: their trainable tensors are averaged; LoRA runs on updates."""
    from safetensors.torch import load_file, save_file

    from gemmalab.cli import main

    def fake_run(name, tensors, lora=None, seed=0):
        run = tmp_path / name
        (run / "checkpoints" / "step-000004").mkdir(parents=True)
        (run / "checkpoints" / "latest").write_text("step-000004")
        save_file(tensors, str(run / "checkpoints" / "step-000004" / "model.safetensors"))
        (run / "config.json").write_text(json.dumps({"model": {"preset": "tiny"}, "run": {"seed": seed},
                                                     "lora": lora or {"rank": 0}}))
        return run

    a = fake_run("a", {"w": torch.zeros(2, 3)})
    b = fake_run("b", {"w": torch.ones(2, 3)})
    assert main(["merge", "average", str(a), str(b / "checkpoints" / "step-000004"), "-o", str(tmp_path / "ab")]) == 0
    assert "the average of 2 checkpoints (1 tensors)" in capsys.readouterr().out
    torch.testing.assert_close(load_file(str(tmp_path / "ab" / "model.safetensors"))["w"], torch.full((2, 3), 0.5))
    c = fake_run("c", {"w": torch.ones(2, 3)}, seed=1)  # a preset drawn from another seed: another base
    assert main(["merge", "average", str(a), str(c), "-o", str(tmp_path / "ac")]) == 1
    assert "another base" in capsys.readouterr().err
    lo = {"rank": 4, "alpha": 8.0}
    la = fake_run("la", adapter(1), lora=lo)
    lb = fake_run("lb", adapter(2), lora=lo)
    assert main(["merge", "average", str(la), str(lb), "-o", str(tmp_path / "lab")]) == 0
    capsys.readouterr()
    merged = load_file(str(tmp_path / "lab" / "model.safetensors"))
    info = json.loads((tmp_path / "lab" / "merge.json").read_text())
    assert info["lora"] == {"rank": 8, "scale": 2.0, "alpha": 16.0}
    want = 0.5 * (lora_delta(adapter(1)["q.lora_a"], adapter(1)["q.lora_b"], 2.0)
                  + lora_delta(adapter(2)["q.lora_a"], adapter(2)["q.lora_b"], 2.0))
    torch.testing.assert_close(lora_delta(merged["q.lora_a"], merged["q.lora_b"], 2.0), want, rtol=0, atol=1e-5)
