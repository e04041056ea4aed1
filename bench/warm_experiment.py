"""WARM on a toy task (tier S1): weight-averaged reward models under 25% label noise, with a tiny
Gemma 3 from gemmalab.model, fine-tuned in full on CPU.

    nice -n 10 python bench/warm_experiment.py             # 3 seeds, ~6-8 min on 2 shared cores
    python bench/warm_experiment.py --quick                # the same pipeline in ~2 minutes

Claims (Rame et al. 2024, "WARM", arXiv 2401.12187),
stated in the doc before the results. With 25% of the training labels flipped:
  (i)   the uniform weight average (WA) of M reward models fine-tuned from one shared init is at
        least as accurate out of distribution as the best single member (chosen on ID validation)
        and about as accurate as prediction ensembling (ENS, the mean of the members' rewards);
  (ii)  WA agrees with fewer of the flipped training pairs than ENS (memorises less label noise);
  (iii) linear mode connectivity: the accuracy of (1 - l) phi_1 + l phi_2 stays at or above the
        chord (1 - l) Acc(phi_1) + l Acc(phi_2).
Control: two RMs trained from DIFFERENT random inits (no pre-training) do not average (their
interpolation falls below the chord).

Task. Tokens: <pad> 0, <eos> 1, <bos> 2, digits 3..12, ">" 13. A prompt is k random digits, a
response is an attempt to sort them; a row is `<bos> prompt > response <eos>` and the reward is
read at <eos> (rewards.model.RewardModel: the last real token). The hidden oracle score is graded:
    score = sortedness + content,  sortedness = fraction of position pairs i < j with r_i <= r_j
    (a Kendall-tau-like order score), content = multiset overlap of response and prompt digits / k.
Pairs are two responses to one prompt, labelled by the oracle (ties and identical responses
dropped). Samplers: ID = sorted, then 0..k random transpositions, then each digit replaced by a
random one with probability 0.15; OOD = a different "policy": sorted, then 1-3 random segment
reversals (near-sorted responses, no substitutions, so pairs differ by small order changes). A
second shifted set, OOD-long, uses the ID sampler at k + 2 digits (length generalisation; reported,
not part of the claims).

Per seed (a seed draws the data, the label flips and the shared init):
1. backbone: a tiny Gemma 3 (gemmalab.model.Gemma3; `tiny` preset, 2 layers, d = 64, vocab 16,
   train.build.init_weights), pre-trained briefly by next-token prediction on ID rows;
2. shared head: a linear probe (RewardHead on the frozen backbone's <eos> states, Bradley-Terry
   loss train.losses.bt_loss on the noisy training pairs), shared by all members as in WARM;
3. members: M = 6 full fine-tunes (backbone + head) from that one init, lr in {1e-4, 3e-4, 1e-3} x
   2 data orders, AdamW, warm-up then cosine, several epochs so that noise can be memorised;
4. merges: WA = train.averaging.average of the 6 state dicts (uniform); ENS = the mean of the six
   rewards; the best single member by ID validation accuracy; the LMC curve of members
   (lr 3e-4, order A) and (lr 1e-3, order B) at l in {0, .25, .5, .75, 1} (averaging with weights);
5. control: 2 RMs from two other random inits (no pre-training, random head), lr 1e-3, WA and LMC.
Metrics: accuracy on clean ID test and OOD test pairs (ties of the RM count half); agreement with
the flipped training pairs (the RM prefers the corrupted label = memorised noise) and accuracy on
the clean training pairs. Means over seeds with their range, and a stratified bootstrap (pairs
resampled within each seed, 2,000 resamples) for 95% intervals of the means and paired differences.

Writes docs/reward_models.md (between the warm-toy markers, via bench/docs_section.py) and
docs/warm_experiment.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's gemmalab, whatever is installed

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from docs_section import replace_section  # noqa: E402  (bench/, the script's directory)
from gemmalab.config import FULL, SLIDING, get_config  # noqa: E402
from gemmalab.model import Gemma3  # noqa: E402
from gemmalab.train.averaging import average  # noqa: E402
from gemmalab.train.build import init_weights  # noqa: E402
from gemmalab.train.losses import bt_loss  # noqa: E402
from gemmalab.train.rewards.model import RewardHead, RewardModel, rows_batch  # noqa: E402

BEGIN, END = "<!-- warm-toy:begin -->", "<!-- warm-toy:end -->"
PAD, EOS, BOS, SEP, DIGIT0, VOCAB = 0, 1, 2, 13, 3, 16
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S} +{time.time() - T0:5.0f}s] {msg}", flush=True)


# ---- task: oracle, samplers, pairs ---------------------------------------------------------------

def oracle(prompt: list[int], resp: list[int]) -> float:
    """sortedness (fraction of pairs i < j in order) + content (multiset overlap with the prompt / k)."""
    k = len(resp)
    ordered = sum(resp[i] <= resp[j] for i in range(k) for j in range(i + 1, k))
    overlap = sum(min(prompt.count(d), resp.count(d)) for d in set(resp))
    return ordered / (k * (k - 1) / 2) + overlap / len(prompt)


def sample_id(rng: random.Random, prompt: list[int]) -> list[int]:
    r, k = sorted(prompt), len(prompt)
    for _ in range(rng.randint(0, k)):
        i, j = rng.randrange(k), rng.randrange(k)
        r[i], r[j] = r[j], r[i]
    return [rng.randrange(10) if rng.random() < 0.15 else d for d in r]


def sample_ood(rng: random.Random, prompt: list[int]) -> list[int]:
    r, k = sorted(prompt), len(prompt)
    for _ in range(rng.randint(1, 3)):
        n = rng.randint(2, 4)
        i = rng.randrange(k - n + 1)
        r[i:i + n] = r[i:i + n][::-1]
    return r


def make_pairs(rng: random.Random, n: int, k: int, sampler) -> list[tuple[list[int], list[int], list[int]]]:
    """n (prompt, better, worse) triples by the oracle; ties and identical responses are dropped."""
    out = []
    while len(out) < n:
        p = [rng.randrange(10) for _ in range(k)]
        a, b = sampler(rng, p), sampler(rng, p)
        sa, sb = oracle(p, a), oracle(p, b)
        if a == b or abs(sa - sb) < 1e-9:
            continue
        out.append((p, a, b) if sa > sb else (p, b, a))
    return out


def row(prompt: list[int], resp: list[int]) -> list[int]:
    return [BOS] + [DIGIT0 + d for d in prompt] + [SEP] + [DIGIT0 + d for d in resp] + [EOS]


def encode_pairs(triples, flipped=None) -> dict:
    """Rows of the pairs as rewards.model.rows_batch tensors: chosen rows first, then rejected.
    `flipped` swaps the label of the marked pairs (the noisy training set)."""
    flipped = flipped if flipped is not None else [False] * len(triples)
    chosen = [row(p, w if f else b) for (p, b, w), f in zip(triples, flipped)]
    rejected = [row(p, b if f else w) for (p, b, w), f in zip(triples, flipped)]
    batch = rows_batch(chosen + rejected, PAD)
    batch["n"] = len(triples)
    batch["flipped"] = torch.tensor(flipped, dtype=torch.bool)
    return batch


# ---- models -------------------------------------------------------------------------------------

def backbone_config(args):
    # the `tiny` preset cut to `layers` blocks, the last one global; a window longer than any row
    layers = args.layers
    return get_config("tiny").replace(
        name="warm-toy", num_hidden_layers=layers, hidden_size=args.d_model, intermediate_size=2 * args.d_model,
        vocab_size=VOCAB, sliding_window=64, layer_types=tuple([SLIDING] * (layers - 1) + [FULL]))


def new_backbone(args, seed: int) -> Gemma3:
    torch.manual_seed(seed)
    model = Gemma3(backbone_config(args))
    init_weights(model)
    return model


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain_lm(model: Gemma3, rows: torch.Tensor, steps: int, lr: float, batch: int, seed: int) -> float:
    """Next-token prediction on fixed-length ID rows (B, T); returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, steps // 10)
        x = rows[torch.randint(len(rows), (batch,), generator=g)]
        logits = model(x[:, :-1])  # (B, T-1, V)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss)


def take(batch: dict, idx: torch.Tensor) -> dict:
    """Pairs idx of an encoded set, as 2B rows (chosen then rejected)."""
    n = batch["n"]
    rows = torch.cat([idx, idx + n])
    return {k: batch[k][rows] for k in ("input_ids", "positions", "segment_ids", "last_index")}


def pair_scores(rm: RewardModel, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    r = rm.scores(b["input_ids"], b["positions"], b["segment_ids"], b["last_index"])
    half = r.shape[0] // 2
    return r[:half], r[half:]


@torch.no_grad()
def diffs(rm: RewardModel, batch: dict, chunk: int = 512) -> np.ndarray:
    """r(chosen) - r(rejected) per pair, in eval mode."""
    rm.eval()
    out = []
    for s in range(0, batch["n"], chunk):
        rc, rr = pair_scores(rm, take(batch, torch.arange(s, min(s + chunk, batch["n"]))))
        out.append((rc - rr).double().numpy())
    rm.train()
    return np.concatenate(out)


@torch.no_grad()
def eos_states(backbone: Gemma3, batch: dict) -> torch.Tensor:
    """Final hidden states at each row's last token (2n, d): the linear probe's features."""
    backbone.eval()
    h = backbone.hidden_states(batch["input_ids"], batch["positions"], segment_ids=batch["segment_ids"])
    return h[torch.arange(h.shape[0]), batch["last_index"]]


def linear_probe(backbone: Gemma3, train: dict, seed: int, steps: int = 300, lr: float = 0.05) -> RewardHead:
    """WARM's shared head: a RewardHead fitted by the BT loss on the frozen backbone's features."""
    feats = eos_states(backbone, train)
    n = train["n"]
    head = RewardHead(feats.shape[1])
    head.reset(seed, 0.02)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        r = head(feats)
        loss = bt_loss(r[:n], r[n:], reduction="mean") + 1e-4 * head.weight.square().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head


def finetune(rm: RewardModel, train: dict, lr: float, order_seed: int, epochs: int, batch: int) -> float:
    """Full fine-tuning (backbone + head) by the Bradley-Terry loss; epoch e visits the pairs in the
    order of random.Random(order_seed * 1000 + e). Returns the mean loss of the last epoch."""
    n = train["n"]
    per_epoch = n // batch
    total = per_epoch * epochs
    opt = torch.optim.AdamW(rm.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    rm.train()
    step, last = 0, []
    for e in range(epochs):
        order = list(range(n))
        random.Random(order_seed * 1000 + e).shuffle(order)
        order = torch.tensor(order)
        last = []
        for i in range(per_epoch):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, lr, max(1, total // 20))
            rc, rr = pair_scores(rm, take(train, order[i * batch:(i + 1) * batch]))
            loss = bt_loss(rc, rr, reduction="mean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last.append(float(loss))
            step += 1
    return float(np.mean(last))


def with_weights(template: RewardModel, sd: dict) -> RewardModel:
    m = copy.deepcopy(template)
    m.load_state_dict(sd)
    return m


# ---- one seed -----------------------------------------------------------------------------------

def correct(d: np.ndarray) -> np.ndarray:
    """1 where the RM prefers the labelled chosen response, 0.5 on a tie."""
    return (d > 0).astype(np.float64) + 0.5 * (d == 0)


def run_seed(seed: int, args) -> dict:
    rng = random.Random(seed)
    k = args.k
    t_seed = time.time()
    train_triples = make_pairs(rng, args.train_pairs, k, sample_id)
    flipped = [False] * len(train_triples)
    for i in rng.sample(range(len(train_triples)), round(args.flip * len(train_triples))):
        flipped[i] = True
    sets = {"train": encode_pairs(train_triples, flipped),
            "val": encode_pairs(make_pairs(rng, args.val_pairs, k, sample_id)),
            "id": encode_pairs(make_pairs(rng, args.test_pairs, k, sample_id)),
            "ood": encode_pairs(make_pairs(rng, args.test_pairs, k, sample_ood)),
            "ood_long": encode_pairs(make_pairs(rng, args.test_pairs, k + 2, sample_id))}
    lm_rows = torch.tensor([row(p, sample_id(rng, p)) for p in
                            ([rng.randrange(10) for _ in range(k)] for _ in range(args.lm_rows))])

    def evaluate(rm: RewardModel) -> dict:
        return {name: diffs(rm, b) for name, b in sets.items()}

    # 1-2. the shared init: pre-trained backbone + linear-probe head
    backbone = new_backbone(args, seed)
    t = time.time()
    lm_loss = pretrain_lm(backbone, lm_rows, args.lm_steps, args.lm_lr, 64, seed)
    head = linear_probe(backbone, sets["train"], seed)
    init = RewardModel(backbone, head)
    init_d = evaluate(init)
    log(f"seed {seed}: shared init ready in {time.time() - t:.0f}s (LM loss {lm_loss:.3f}; probe ID acc "
        f"{correct(init_d['id']).mean():.3f}, OOD {correct(init_d['ood']).mean():.3f})")

    # 3. members
    members, member_d, hp = [], [], []
    for lr in args.lrs:
        for order in (0, 1):
            t = time.time()
            rm = copy.deepcopy(init)
            loss = finetune(rm, sets["train"], lr, seed * 10 + order, args.epochs, args.batch)
            d = evaluate(rm)
            members.append({k2: v.detach().clone() for k2, v in rm.state_dict().items()})
            member_d.append(d)
            hp.append({"lr": lr, "order": "AB"[order]})
            fl = sets["train"]["flipped"].numpy()
            log(f"seed {seed}: member lr {lr:g} order {'AB'[order]}: {time.time() - t:.0f}s, loss {loss:.3f}, "
                f"val {correct(d['val']).mean():.3f}, ID {correct(d['id']).mean():.3f}, OOD "
                f"{correct(d['ood']).mean():.3f}, flipped agreement {correct(d['train'][fl]).mean():.3f}")

    # 4. merges
    t = time.time()
    wa = with_weights(init, average(members))
    wa_d = evaluate(wa)
    ens_d = {name: np.mean([d[name] for d in member_d], axis=0) for name in sets}
    best = int(np.argmax([correct(d["val"]).mean() for d in member_d]))
    i1 = next(i for i, h in enumerate(hp) if h == {"lr": args.lrs[1], "order": "A"})
    i2 = next(i for i, h in enumerate(hp) if h == {"lr": args.lrs[2], "order": "B"})
    lmc = {}
    for lam in args.lambdas:
        d = (member_d[i1] if lam == 0 else member_d[i2] if lam == 1 else
             evaluate(with_weights(init, average([members[i1], members[i2]], [1 - lam, lam]))))
        lmc[lam] = d
    log(f"seed {seed}: WA ID {correct(wa_d['id']).mean():.3f} OOD {correct(wa_d['ood']).mean():.3f}; ENS ID "
        f"{correct(ens_d['id']).mean():.3f} OOD {correct(ens_d['ood']).mean():.3f}; merges {time.time() - t:.0f}s")

    # 5. control: two RMs from different random inits, no pre-training
    control = {}
    if args.control:
        t = time.time()
        cms, cds = [], []
        for j in (1, 2):
            rm = RewardModel(new_backbone(args, seed * 1000 + 17 * j), RewardHead(args.d_model))
            rm.head.reset(seed * 1000 + 17 * j, 0.02)
            finetune(rm, sets["train"], args.lrs[-1], seed * 10 + j - 1, args.epochs, args.batch)
            cms.append({k2: v.detach().clone() for k2, v in rm.state_dict().items()})
            cds.append(evaluate(rm))
        control = {lam: (cds[0] if lam == 0 else cds[1] if lam == 1 else
                         evaluate(with_weights(rm, average([cms[0], cms[1]], [1 - lam, lam]))))
                   for lam in args.lambdas}
        log(f"seed {seed}: control (2 scratch RMs, different inits) ID "
            f"{correct(cds[0]['id']).mean():.3f} / {correct(cds[1]['id']).mean():.3f}, their WA "
            f"{correct(control[0.5]['id']).mean():.3f}; {time.time() - t:.0f}s")

    log(f"seed {seed} done in {time.time() - t_seed:.0f}s")
    return {"sets": {name: b["n"] for name, b in sets.items()},
            "flipped": sets["train"]["flipped"].numpy(), "init": init_d, "members": member_d, "hp": hp,
            "best": best, "wa": wa_d, "ens": ens_d, "lmc_pair": [i1, i2], "lmc": lmc, "control": control}


# ---- statistics ---------------------------------------------------------------------------------

def boot_index(runs: list[dict], name: str, n_boot: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per seed, n_boot resamples (with replacement) of the pair indices of set `name`."""
    out = []
    for r in runs:
        n = len(r["wa"][name]) if name != "flipped" else int(r["flipped"].sum())
        out.append(rng.integers(0, n, size=(n_boot, n)))
    return out


def vec(r: dict, method: str, name: str) -> np.ndarray:
    """Per-pair correctness of a method on a set; name 'flipped' = agreement with the flipped
    training labels, 'clean_train' = accuracy on the clean training pairs."""
    base = {"flipped": "train", "clean_train": "train"}.get(name, name)
    if method in ("scratch", "scratch_wa"):  # the control: one scratch RM (lambda 0), their midpoint
        d = r["control"][0.0 if method == "scratch" else 0.5][base]
    else:
        d = {"wa": r["wa"], "ens": r["ens"], "best": r["members"][r["best"]], "init": r["init"]}[method][base]
    c = correct(d)
    if name == "flipped":
        return c[r["flipped"]]
    if name == "clean_train":
        return c[~r["flipped"]]
    return c


def summary(runs: list[dict], name: str, methods, idx) -> dict:
    """Mean over seeds, per-seed values, and the stratified bootstrap 95% CI of each method and of
    the paired differences WA - ENS and WA - best."""
    per = {m: [vec(r, m, name) for r in runs] for m in methods}
    out = {}

    def stats(get) -> dict:
        values = [float(get(s).mean()) for s in range(len(runs))]
        boots = np.mean([get(s)[idx[s]].mean(axis=1) for s in range(len(runs))], axis=0)
        lo, hi = np.percentile(boots, [2.5, 97.5])
        return {"mean": float(np.mean(values)), "per_seed": values, "min": min(values), "max": max(values),
                "ci95": [float(lo), float(hi)]}

    for m in methods:
        out[m] = stats(lambda s, m=m: per[m][s])
    for a, b in (("wa", "ens"), ("wa", "best"), ("ens", "best")):
        out[f"{a}-{b}"] = stats(lambda s, a=a, b=b: per[a][s] - per[b][s])
    return out


def lmc_table(runs: list[dict], key: str, name: str, idx) -> dict:
    """acc(l) and gap(l) = acc(l) - chord(l), mean over seeds and per seed, with the stratified
    bootstrap 95% CI of the mean gap (per pair, gap = c_l - (1 - l) c_0 - l c_1)."""
    lams = sorted(runs[0][key])
    out = {}
    for lam in lams:
        accs, gaps, boots = [], [], []
        for s, r in enumerate(runs):
            c = {l2: correct(r[key][l2][name]) for l2 in lams}
            g = c[lam] - ((1 - lam) * c[0.0] + lam * c[1.0])
            accs.append(float(c[lam].mean()))
            gaps.append(float(g.mean()))
            boots.append(g[idx[s]].mean(axis=1))
        lo, hi = np.percentile(np.mean(boots, axis=0), [2.5, 97.5])
        out[lam] = {"acc": float(np.mean(accs)), "gap": float(np.mean(gaps)), "gap_ci95": [float(lo), float(hi)],
                    "gap_per_seed": gaps, "acc_per_seed": accs}
    return out


# ---- report -------------------------------------------------------------------------------------

def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def ci(s: dict) -> str:
    return f"{pct(s['mean'])} [{pct(s['ci95'][0])}, {pct(s['ci95'][1])}]"


def rng_(s: dict) -> str:
    return f"{pct(s['min'])}-{pct(s['max'])}"


def sgn(s: dict) -> str:
    return f"{100 * s['mean']:+.1f} [{100 * s['ci95'][0]:+.1f}, {100 * s['ci95'][1]:+.1f}]"


def verdicts(res: dict) -> dict:
    """The criteria written in the doc before the results."""
    ood, fl = res["ood"], res["flipped"]
    lmc = res["lmc"]
    inner = [lam for lam in lmc["id"] if 0 < lam < 1]
    c1a = ood["wa-best"]["mean"] >= 0
    c1a_noise = ood["wa-best"]["ci95"][1] >= 0
    c1b = ood["wa-ens"]["ci95"][0] >= -0.01
    c2 = fl["wa"]["mean"] < fl["ens"]["mean"]
    c2_sig = fl["wa-ens"]["ci95"][1] < 0
    c3 = all(lmc[name][lam]["gap"] >= 0 for name in ("id", "ood") for lam in inner)
    c3_noise = all(lmc[name][lam]["gap_ci95"][1] >= 0 for name in ("id", "ood") for lam in inner)
    ctrl = res.get("control_lmc")
    c_ctrl = None if not ctrl else ctrl["id"][0.5]["gap"] < -0.02
    return {"i_wa_ge_best_ood": c1a, "i_wa_ge_best_ood_within_ci": c1a_noise, "i_wa_about_ens_ood": c1b,
            "ii_wa_memorises_less": c2, "ii_significant": c2_sig, "iii_lmc": c3, "iii_lmc_within_ci": c3_noise,
            "control_lmc_fails": c_ctrl}


def word(ok) -> str:
    return {True: "**holds**", False: "**does not hold**", None: "not run"}[ok]


def render(res: dict, args) -> str:
    v = res["verdicts"]
    idt, ood, oodl, fl, ct = res["id"], res["ood"], res["ood_long"], res["flipped"], res["clean_train"]
    env = res["environment"]
    n_seeds = len(res["seeds"])
    lines = [
        BEGIN,
        "## WARM on a toy task (S1): weight averaging vs ensembling under 25% label noise",
        "",
        f"`nice -n 10 python bench/warm_experiment.py{' --quick' if args.quick else ''}`; raw numbers in "
        "`docs/warm_experiment.json`. Rame et al. 2024 (arXiv 2401.12187).",
        "",
        "### Claims, stated before running",
        "",
        f"With {round(100 * args.flip)}% of the training labels flipped:",
        "",
        "1. **(i)** the uniform weight average (WA) of M = 6 reward models fine-tuned from one shared "
        "init is at least as accurate OOD as the best single member (chosen by ID validation accuracy), "
        "and about as accurate as prediction ensembling (ENS, the mean of the six rewards). Criteria: "
        "mean WA - best >= 0 on OOD (if < 0 with the 95% CI reaching 0: \"not shown, within noise\"); "
        "the 95% CI of WA - ENS on OOD above -1 point.",
        "2. **(ii)** WA agrees with fewer flipped training pairs than ENS (memorises less noise). "
        "Criterion: mean WA < mean ENS; significant if the CI of WA - ENS lies below 0.",
        "3. **(iii)** linear mode connectivity: for two members (lr 3e-4 order A, lr 1e-3 order B), "
        "accuracy at lambda = .25, .5, .75 is at or above the chord, averaged over seeds, on ID and OOD "
        "(a negative mean gap whose 95% CI reaches 0: \"holds within noise\"; a CI below 0: fails).",
        "4. Control: two RMs trained from different random inits (no pre-training) are not "
        "connected: their midpoint is > 2 points below the chord on ID.",
        "",
        "### Setup",
        "",
        f"- Task: a prompt is {args.k} random digits; a response tries to sort them. Oracle score = "
        "sortedness (fraction of position pairs in order) + content (multiset overlap with the prompt / k). "
        "Pairs = two responses to one prompt, labelled by the oracle, ties dropped.",
        "- ID sampler: sorted, 0..k random transpositions, each digit replaced with prob. 0.15. "
        "**OOD**: another sampler (1-3 segment reversals of the sorted list, no substitutions: near-sorted, "
        f"subtle pairs). OOD-long: the ID sampler at {args.k + 2} digits (length shift; not in the claims).",
        f"- {args.train_pairs} training pairs ({round(args.flip * args.train_pairs)} flipped), "
        f"{args.val_pairs} clean ID validation pairs (member selection), {args.test_pairs} clean test pairs "
        "per test set.",
        f"- Model: `gemmalab.model.Gemma3` (`tiny` preset cut to {args.layers} layers, d = {args.d_model}, "
        f"MLP {2 * args.d_model}, 4 heads, vocab 16; `train.build.init_weights`), pre-trained "
        f"{args.lm_steps} steps by next-token prediction on ID rows; shared head = linear probe "
        "(`RewardHead`, `bt_loss`) on the frozen pre-trained backbone. Members: full fine-tuning of "
        f"backbone + head, AdamW, lr in {{{', '.join(f'{x:g}' for x in args.lrs)}}} x 2 data orders, "
        f"{args.epochs} epochs of batch {args.batch} pairs, 5% warm-up then cosine to 0.1 lr. "
        "WA = `train.averaging.average`; LMC by `average(..., weights=[1 - l, l])`. No dropout "
        "(gemmalab's model has none), so diversity = lr x data order only.",
        f"- {n_seeds} seeds ({', '.join(map(str, res['seeds']))}): each draws the data, the flips and "
        "the shared init. Numbers: accuracy in % (mean over seeds [95% CI of the mean, stratified "
        "bootstrap over pairs, 2,000 resamples]; range over seeds). The CI covers test-pair sampling "
        "given the trained models, not training randomness (that is the range).",
        "",
        "### Results",
        "",
        "| | ID test acc | OOD test acc | OOD-long acc | flipped train pairs agreed with (lower = less memorised) | clean train acc |",
        "|---|---|---|---|---|---|",
    ]
    names = {"init": "shared init (probe only)", "best": "best single member (by ID val)",
             "ens": "ENS (mean reward of 6)", "wa": "**WA** (weight average of 6)",
             "scratch": "control: one RM from scratch (its own random init, lr 1e-3)",
             "scratch_wa": "control: WA of 2 scratch RMs (different inits)"}
    for m in [m for m in names if m in idt]:
        lines.append(f"| {names[m]} | {ci(idt[m])} ({rng_(idt[m])}) | {ci(ood[m])} ({rng_(ood[m])}) | "
                     f"{ci(oodl[m])} | {ci(fl[m])} ({rng_(fl[m])}) | {ci(ct[m])} |")
    for a, b in (("wa", "ens"), ("wa", "best")):
        lines.append(f"| {a.upper()} - {b.upper() if b == 'ens' else 'best'} (points) | {sgn(idt[f'{a}-{b}'])} | "
                     f"{sgn(ood[f'{a}-{b}'])} | {sgn(oodl[f'{a}-{b}'])} | {sgn(fl[f'{a}-{b}'])} | "
                     f"{sgn(ct[f'{a}-{b}'])} |")
    lines += ["", "Members (mean over seeds):", "",
              "| member | ID val | ID test | OOD | flipped agreed |", "|---|---|---|---|---|"]
    for j, h in enumerate(res["member_table"]):
        lines.append(f"| lr {h['lr']:g}, order {h['order']} | {pct(h['val'])} | {pct(h['id'])} | "
                     f"{pct(h['ood'])} | {pct(h['flipped'])} |")
    lines += ["", f"Best member picked per seed: {', '.join(res['best_picked'])}.", "",
              "Linear mode connectivity (accuracy at lambda, and its gap to the chord in points; mean over "
              "seeds, per-seed minimum gap):", "",
              "| lambda | members ID | gap | members OOD | gap | min gap (ID / OOD) | control ID | gap | control OOD | gap |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lm, cl = res["lmc"], res.get("control_lmc")
    for lam in sorted(lm["id"]):
        a, b = lm["id"][lam], lm["ood"][lam]
        row_ = (f"| {lam:g} | {pct(a['acc'])} | {100 * a['gap']:+.1f} | {pct(b['acc'])} | {100 * b['gap']:+.1f} | "
                f"{100 * min(a['gap_per_seed']):+.1f} / {100 * min(b['gap_per_seed']):+.1f} |")
        if cl:
            c, d = cl["id"][lam], cl["ood"][lam]
            row_ += f" {pct(c['acc'])} | {100 * c['gap']:+.1f} | {pct(d['acc'])} | {100 * d['gap']:+.1f} |"
        else:
            row_ += " - | - | - | - |"
        lines.append(row_)
    lines += ["", "### Verdicts", "",
              f"- (i) WA vs best single, OOD: {sgn(ood['wa-best'])} points -> "
              f"{word(v['i_wa_ge_best_ood']) if v['i_wa_ge_best_ood'] or not v['i_wa_ge_best_ood_within_ci'] else 'not shown (below, within noise)'}; "
              f"WA vs ENS, OOD: {sgn(ood['wa-ens'])} points -> {word(v['i_wa_about_ens_ood'])}.",
              f"- (ii) flipped-pair agreement WA {pct(fl['wa']['mean'])}% vs ENS {pct(fl['ens']['mean'])}% "
              f"(WA - ENS {sgn(fl['wa-ens'])}) -> {word(v['ii_wa_memorises_less'])}"
              f"{' (significant)' if v['ii_significant'] else ' (not significant)' if v['ii_wa_memorises_less'] else ''}.",
              f"- (iii) LMC between members: {word(v['iii_lmc']) if v['iii_lmc'] else '**holds within noise**' if v['iii_lmc_within_ci'] else word(False)} "
              f"(smallest mean gap {100 * min(lm[n][l]['gap'] for n in ('id', 'ood') for l in lm[n] if 0 < l < 1):+.1f} points).",
              f"- Control (different inits): {word(v['control_lmc_fails'])} (midpoint gap on ID "
              f"{100 * cl['id'][0.5]['gap']:+.1f} points)." if cl else "- Control: not run.",
              "", "### Reading", "", *reading(res), "", res["notes"], "",
              f"Machine: {env['cpu']}, {env['threads']} torch threads, load average {env['load_start'][0]:.2f} at "
              f"start / {env['load_end'][0]:.2f} at end; wall time {env['wall_s'] / 60:.1f} min; torch "
              f"{env['torch']}; commit `{env['commit'][:12]}`{' (+ uncommitted changes)' if env['dirty'] else ''}; "
              f"{env['date']}.",
              END]
    return "\n".join(lines)


def reading(res: dict) -> list[str]:
    """What the verdicts leave out: the comparison with the shared init itself and with a scratch RM."""
    idt, ood, fl = res["id"], res["ood"], res["flipped"]
    m = lambda s, k: pct(s[k]["mean"])  # noqa: E731
    hot = [h for h in res["member_table"] if h["lr"] > min(x["lr"] for x in res["member_table"])]
    out = [f"- The shared init alone (pre-trained backbone + linear probe, no fine-tuning): ID {m(idt, 'init')}, "
           f"OOD {m(ood, 'init')}, and it agrees with {m(fl, 'init')}% of the flipped pairs (WA: ID {m(idt, 'wa')}, "
           f"OOD {m(ood, 'wa')}, {m(fl, 'wa')}%)."]
    if idt["wa"]["mean"] <= idt["init"]["mean"]:
        out[-1] += (" Fine-tuning on the noisy labels did not raise ID accuracy above the init's here: the members "
                    f"with the larger learning rates memorised noise (ID {pct(np.mean([h['id'] for h in hot]))}, "
                    f"flipped agreement {pct(np.mean([h['flipped'] for h in hot]))}% on average) and the average "
                    "pulls them back towards the init.")
        low = f"lr {min(x['lr'] for x in res['member_table']):g} "
        if all(b.startswith(low) for b in res["best_picked"]):
            out[-1] += " The best member by ID validation was the mildest learning rate in every seed."
    if idt["wa-best"]["mean"] < 0:
        out.append(f"- In distribution WA is not better than the best member (WA - best {sgn(idt['wa-best'])} "
                   "points); its gain is out of distribution.")
    if "scratch" in ood and ood["scratch"]["mean"] > ood["wa"]["mean"]:
        out.append(f"- One RM trained from scratch (no pre-training) is more accurate OOD ({m(ood, 'scratch')}) than "
                   f"WA ({m(ood, 'wa')}), at ID {m(idt, 'scratch')}: the next-token pre-training on ID rows gives "
                   "features that transfer less well to the OOD sampler. The claims compare WA with its own "
                   "members and with ENS, which is what this toy tests; it is no evidence that the shared "
                   "pre-trained init is a better starting point than none.")
    return out


def from_json(path: Path) -> tuple[dict, argparse.Namespace]:
    """A saved result (docs/warm_experiment.json) and its arguments, to render the doc again."""
    res = json.loads(path.read_text())
    for key in ("lmc", "control_lmc"):
        if key in res:
            res[key] = {name: {float(lam): v for lam, v in t.items()} for name, t in res[key].items()}
    return res, argparse.Namespace(**res["config"])


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git(*cmd: str) -> str:
    try:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--k", type=int, default=6, help="digits per prompt (ID and OOD)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--train-pairs", type=int, default=1000)
    p.add_argument("--val-pairs", type=int, default=500)
    p.add_argument("--test-pairs", type=int, default=2000)
    p.add_argument("--flip", type=float, default=0.25)
    p.add_argument("--lm-rows", type=int, default=20000)
    p.add_argument("--lm-steps", type=int, default=300)
    p.add_argument("--lm-lr", type=float, default=3e-3)
    p.add_argument("--lrs", type=float, nargs=3, default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--no-control", dest="control", action="store_false")
    # 1 thread: these ops are tiny, and 2 OpenMP threads on 2 cores shared with other jobs ran 7x
    # slower than 1 (measured: 230 vs 32 ms per step at load average 5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="1 seed, fewer pairs and steps (a smoke run)")
    p.add_argument("--no-docs", action="store_true", help="print the table, write nothing under docs/")
    p.add_argument("--notes", default="", help="a paragraph for the doc (what changed, problems met)")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="rewrite the doc section from a saved result (docs/warm_experiment.json); no training")
    args = p.parse_args()
    if args.render:
        res, saved = from_json(args.render)
        text = render(res, saved)
        print(text)
        replace_section(REPO / "docs" / "reward_models.md", BEGIN, END, text, "Reward models")
        return
    if args.quick:
        args.seeds, args.train_pairs, args.test_pairs, args.val_pairs = [0], 800, 1000, 300
        args.lm_steps, args.epochs, args.lm_rows = 150, 4, 5000
    args.lambdas = [0.0, 0.25, 0.5, 0.75, 1.0]
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    log(f"WARM toy: seeds {args.seeds}, {args.train_pairs} train pairs, M = 6, {args.epochs} epochs; "
        f"load {load_start[0]:.2f}")

    runs = [run_seed(s, args) for s in args.seeds]

    rng = np.random.default_rng(12345)
    n_boot = 2000
    res: dict = {"seeds": args.seeds}
    methods = ("init", "best", "ens", "wa") + (("scratch", "scratch_wa") if args.control else ())
    idx = {}
    for name in ("id", "ood", "ood_long", "flipped", "clean_train"):
        if name == "clean_train":
            idx[name] = [rng.integers(0, int((~r["flipped"]).sum()), size=(n_boot, int((~r["flipped"]).sum())))
                         for r in runs]
        else:
            idx[name] = boot_index(runs, name, n_boot, rng)
        res[name] = summary(runs, name, methods, idx[name])
    res["lmc"] = {name: lmc_table(runs, "lmc", name, idx[name]) for name in ("id", "ood")}
    if args.control:
        res["control_lmc"] = {name: lmc_table(runs, "control", name, idx[name]) for name in ("id", "ood")}
    table = []
    for j, h in enumerate(runs[0]["hp"]):
        table.append({**h, **{name: float(np.mean([correct(r["members"][j][name]).mean() for r in runs]))
                              for name in ("val", "id", "ood")},
                      "flipped": float(np.mean([correct(r["members"][j]["train"][r["flipped"]]).mean()
                                                for r in runs]))})
    res["member_table"] = table
    res["best_picked"] = [f"lr {r['hp'][r['best']]['lr']:g} {r['hp'][r['best']]['order']}" for r in runs]
    res["member_per_seed"] = [[{name: float(correct(d[name]).mean()) for name in ("val", "id", "ood", "ood_long")}
                               | {"flipped": float(correct(d["train"][r["flipped"]]).mean())}
                               for d in r["members"]] for r in runs]
    res["verdicts"] = verdicts(res)
    res["notes"] = args.notes
    wall = time.time() - T0
    res["environment"] = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "load_start": list(load_start),
                          "load_end": list(os.getloadavg()), "wall_s": wall, "torch": torch.__version__,
                          "python": platform.python_version(), "commit": git("rev-parse", "HEAD"),
                          "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
                          "date": datetime.date.today().isoformat()}
    res["config"] = {k: v for k, v in vars(args).items() if k not in ("notes",)}
    res["config"]["model"] = {"preset": "tiny", "num_hidden_layers": args.layers, "hidden_size": args.d_model,
                              "intermediate_size": 2 * args.d_model, "vocab_size": VOCAB, "sliding_window": 64,
                              "layer_types": list(backbone_config(args).layer_types)}
    res["set_sizes"] = runs[0]["sets"]
    text = render(res, args)
    print(text)
    if not args.no_docs:
        docs = REPO / "docs"
        replace_section(docs / "reward_models.md", BEGIN, END, text, "Reward models")
        (docs / "warm_experiment.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        log("wrote docs/reward_models.md (warm-toy section) and docs/warm_experiment.json")
    log(f"total {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
