"""Teacher-hacking harness (Tiapkin et al. 2025, arXiv 2502.02671) at the scale of a 2-core CPU.

    nice -n 19 python bench/teacher_hacking.py         # after bench/distill_experiment.py (~25 min)
    python bench/teacher_hacking.py --quick            # the same pipeline in a few minutes

    oracle   the real Gemma 3 270M (the "ground truth")
    teacher  a small Gemma 3 distilled from the oracle: the full-KD student of
             bench/distill_experiment.py (--teacher-run)
    student  a smaller Gemma 3 (d_model 32, 2 layers), from random initialisation

Prompts are 16-token windows of CPython stdlib sources; responses are 24 tokens sampled from the
teacher (temperature 1, no truncation). The student minimises the token-level forward KL to the
teacher on the response tokens (`full_kd_loss`, teacher in the loop) in two regimes with the same
prompts, initialisation, optimiser and number of steps:

    offline  one response per prompt, generated once: a fixed data set trained for many epochs
    online   fresh responses from the teacher for every batch

Every few steps, on held-out prompts with fixed teacher responses: the proxy metric
KL(teacher || student) and the golden metric KL(oracle || student), per response token. A
`PowerLawMonitor` fits the proxy curve's first points and warns when it departs; `golden_u_shape`
says whether the golden curve falls and rises again. Results go between the markers of
docs/distillation.md, to docs/teacher_hacking.png and docs/teacher_hacking.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import sysconfig
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from gemmalab.generate import SamplingParams, generate_steps  # noqa: E402
from gemmalab.train.losses import full_kd_loss, kd_metrics  # noqa: E402
from gemmalab.train.hacking import PowerLawMonitor, golden_u_shape  # noqa: E402
from gemmalab.train.teacher import head_logits  # noqa: E402

from docs_section import replace_section  # noqa: E402  (bench/, the script's directory)

BEGIN, END = "<!-- BEGIN hacking: bench/teacher_hacking.py -->", "<!-- END hacking -->"
STUDENT_ARCH = {"hidden_size": 32, "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"],
                "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                "query_pre_attn_scalar": 16, "intermediate_size": 128, "sliding_window": 32}


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def prompt_pool(tokenizer, n: int, length: int, held_out: bool, seed: int) -> list[list[int]]:
    """n windows of `length` tokens (<bos> + length - 1 source tokens) from stdlib files; held-out
    prompts come from the files bench/distill_experiment.py holds out (every 8th)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    files = [f for i, f in enumerate(files) if (i % 8 == 3) == held_out]
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        ids = tokenizer.encode(rng.choice(files).read_text(encoding="utf-8", errors="replace"), add_bos=False)
        if len(ids) < length * 4:
            continue
        s = rng.randrange(0, len(ids) - length)
        out.append([tokenizer.bos_id] + ids[s:s + length - 1])
    return out


@torch.no_grad()
def generate(model, prompts: list[list[int]], n_new: int, seed: int) -> list[list[int]]:
    """Pure sampling (temperature 1, no top-k / top-p): the teacher's own distribution."""
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=seed)
    cols = [t for t, _ in generate_steps(model, prompts, n_new, params, stop_ids=())]
    return torch.stack(cols, 1).tolist()


def make_batch(prompts, responses) -> dict:
    """input ids (B, L) = prompt + response; targets: the response tokens (predicted from the position
    before each), -100 elsewhere."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    ids = torch.tensor(seqs)
    B, L = ids.shape
    P = len(prompts[0])
    targets = torch.full((B, L), -100, dtype=torch.long)
    targets[:, P - 1:L - 1] = ids[:, P:]
    return {"input_ids": ids, "positions": torch.arange(L).expand(B, L), "targets": targets}


def hidden(model, batch):
    return model.hidden_states(batch["input_ids"], batch["positions"])


@torch.no_grad()
def oracle_logprobs(oracle, batch, chunk: int = 64):
    """The oracle's fp16 log-probabilities at the target positions, and a chunk callable over them."""
    h = hidden(oracle, batch).reshape(-1, oracle.config.hidden_size)
    rows = (batch["targets"].reshape(-1) != -100).nonzero().squeeze(1)
    w = oracle.embed_tokens.weight
    lp = torch.empty(rows.numel(), w.shape[0], dtype=torch.float16)
    for s in range(0, rows.numel(), chunk):
        lp[s:s + chunk] = torch.log_softmax(h[rows[s:s + chunk]] @ w.t(), -1).half()
    compact = torch.full((h.shape[0],), -1, dtype=torch.long)
    compact[rows] = torch.arange(rows.numel())
    return lambda r, v0, v1: lp[compact[r], v0:v1].float()


@torch.no_grad()
def evaluate(student, teacher, batch, oracle_fn) -> dict:
    hs, ht = hidden(student, batch), hidden(teacher, batch)
    ws = student.embed_tokens.weight
    proxy = kd_metrics(hs, ws, batch["targets"], head_logits(ht, teacher.embed_tokens.weight))
    golden = kd_metrics(hs, ws, batch["targets"], oracle_fn)
    n = proxy["tokens"]
    return {"proxy": proxy["kl"] / n, "golden": golden["kl"] / n, "ce_on_teacher_samples": proxy["ce"] / n}


def train_run(name, regime, teacher, init_state, pool, offline_responses, eval_batch, oracle_fn, args):
    from gemmalab.model import Gemma3
    from gemmalab.train.build import preset_config
    student = Gemma3(preset_config("gemma3-270m", STUDENT_ARCH))
    student.load_state_dict(init_state)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    rng = random.Random(args.seed + 1)
    monitor = PowerLawMonitor(fit_points=args.fit_points, tolerance=args.tolerance, patience=2)
    curve, warning, t0 = [], None, time.perf_counter()
    order: list[int] = []
    for step in range(1, args.steps + 1):
        if regime == "offline":  # epochs over the fixed data set, reshuffled each epoch
            if len(order) < args.batch:
                perm = list(range(len(pool)))
                rng.shuffle(perm)
                order += perm
            idx, order = order[:args.batch], order[args.batch:]
            responses = [offline_responses[i] for i in idx]
        else:  # fresh generations from the teacher for the same prompt pool
            idx = [rng.randrange(len(pool)) for _ in range(args.batch)]
            responses = generate(teacher, [pool[i] for i in idx], args.response_len, seed=args.seed * 7919 + step)
        batch = make_batch([pool[i] for i in idx], responses)
        with torch.no_grad():
            ht = hidden(teacher, batch)
        loss = full_kd_loss(hidden(student, batch), student.embed_tokens.weight, batch["targets"],
                            head_logits(ht, teacher.embed_tokens.weight))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            student.eval()
            m = evaluate(student, teacher, eval_batch, oracle_fn)
            student.train()
            m.update(step=step, train_loss=loss.item(), epoch=step * args.batch / len(pool))
            msg = monitor.update(step, m["proxy"])
            if msg and warning is None:
                warning = msg
                warnings.warn(f"{name}: {msg}")
            m["power_law_deviation"] = monitor.deviation(step, m["proxy"]) if monitor.fit else None
            curve.append(m)
            log(f"{name} step {step}: proxy {m['proxy']:.4f}, golden {m['golden']:.4f}, "
                f"train KD loss {m['train_loss']:.3f}")
    return {"curve": curve, "seconds": time.perf_counter() - t0, "power_law": monitor.fit,
            "departed_at": monitor.departed_at, "warning": warning,
            "golden_u": golden_u_shape([p["golden"] for p in curve])}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for (name, r), color in zip(results["runs"].items(), ("C3", "C0")):
        steps = [p["step"] for p in r["curve"]]
        proxy = [p["proxy"] for p in r["curve"]]
        golden = [p["golden"] for p in r["curve"]]
        axes[0].loglog(steps, proxy, "o-", ms=3, color=color, label=f"{name}")
        if r["power_law"]:
            a, b = r["power_law"]
            axes[0].loglog(steps, [a * s ** -b for s in steps], "--", color=color, lw=1,
                           label=f"{name}: power law of the first {results['fit_points']} points")
        if r["departed_at"]:
            axes[0].axvline(r["departed_at"], color=color, ls=":", lw=1)
        axes[1].plot(steps, golden, "o-", ms=3, color=color, label=name)
        axes[2].plot(proxy, golden, "o-", ms=3, color=color, label=name)
    axes[1].axhline(results["teacher_golden"], color="gray", ls="--", lw=1, label="teacher vs oracle")
    axes[0].set(title="proxy: KL(teacher || student), held-out", xlabel="step")
    axes[1].set(title="golden: KL(oracle || student), held-out", xlabel="step")
    axes[2].set(title="golden against proxy", xlabel="proxy (falls with training)", ylabel="golden")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict, png: str) -> str:
    a = results["args"]
    lines = [BEGIN, "",
             f"Produced by `{results['command']}` on {results['date']} ({results['machine']}), "
             f"{results['minutes']:.0f} min. A small-scale version of the paper's setup: "
             f"{a['prompts']} training prompts of {a['prompt_len']} tokens, responses of "
             f"{a['response_len']} tokens, batch {a['batch']}, {a['steps']} steps (offline: "
             f"{a['steps'] * a['batch'] / a['prompts']:.0f} epochs over {a['prompts']} fixed responses; "
             f"online: {a['steps'] * a['batch']:,} fresh responses), AdamW lr {a['lr']}, evaluation on "
             f"{a['eval_prompts']} held-out prompts ({results['eval_tokens']} response tokens) every "
             f"{a['eval_every']} steps. Teacher: `{results['teacher_run']}` "
             f"({results['teacher_parameters'] / 1e6:.1f}M parameters); student "
             f"{results['student_parameters'] / 1e6:.1f}M parameters (d_model 32, 2 layers). "
             f"KL(oracle || teacher) on the held-out responses: {results['teacher_golden']:.3f} nats/token.", "",
             "| regime | proxy first → min → last | golden first → min (step) → last | U-shaped golden | "
             "power-law departure of the proxy | train time |",
             "|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        c = r["curve"]
        gmin = min(c, key=lambda p: p["golden"])
        pmin = min(p["proxy"] for p in c)
        u = r["golden_u"]
        dep = f"step {r['departed_at']}" if r["departed_at"] else "none"
        lines.append(f"| {name} | {c[0]['proxy']:.3f} → {pmin:.3f} → {c[-1]['proxy']:.3f} | "
                     f"{c[0]['golden']:.3f} → {gmin['golden']:.3f} ({gmin['step']}) → {c[-1]['golden']:.3f} | "
                     f"{'yes' if u['u_shape'] else 'no'} (last {100 * u['rise']:+.1f}% vs min) | {dep} | "
                     f"{r['seconds'] / 60:.1f} min |")
    lines += ["", f"![teacher hacking]({png})", ""]
    for name, r in results["runs"].items():
        if r["warning"]:
            lines.append(f"* {name}: warning raised: \"{r['warning']}\"")
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-run", default=str(REPO / "runs" / "distill-experiment" / "run-full"))
    p.add_argument("--docs", default=str(REPO / "docs"))
    p.add_argument("--prompts", type=int, default=8, help="training prompts (offline: one response each)")
    p.add_argument("--eval-prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--response-len", type=int, default=24)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--eval-every", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--fit-points", type=int, default=5, help="proxy points the power law is fitted to")
    p.add_argument("--tolerance", type=float, default=0.05, help="relative departure that warns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a few steps: checks the pipeline, writes no docs")
    args = p.parse_args()
    if args.quick:
        args.steps, args.eval_every, args.eval_prompts, args.fit_points = 12, 3, 2, 2
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    import gemmalab
    from gemmalab.model import Gemma3
    from gemmalab.train.recipes.distill import load_student
    from gemmalab.train.build import init_weights, preset_config

    if not (Path(args.teacher_run) / "checkpoints" / "latest").exists():
        sys.exit(f"{args.teacher_run} holds no trained teacher: run bench/distill_experiment.py first "
                 "(its full-KD student is the teacher here), or pass --teacher-run")
    log("loading the oracle (Gemma 3 270M) and the teacher")
    oracle = gemmalab.load(mode="fp32").model
    teacher, tokenizer = load_student(args.teacher_run)
    pool = prompt_pool(tokenizer, args.prompts, args.prompt_len, held_out=False, seed=args.seed)
    eval_prompts = prompt_pool(tokenizer, args.eval_prompts, args.prompt_len, held_out=True, seed=args.seed + 1)
    log("teacher generations: the offline data set and the held-out evaluation set")
    offline = generate(teacher, pool, args.response_len, seed=args.seed)
    eval_batch = make_batch(eval_prompts, generate(teacher, eval_prompts, args.response_len, seed=args.seed + 2))
    log("oracle log-probabilities on the evaluation set")
    oracle_fn = oracle_logprobs(oracle, eval_batch)
    with torch.no_grad():
        teacher_vs_oracle = kd_metrics(hidden(teacher, eval_batch), teacher.embed_tokens.weight,
                                       eval_batch["targets"], oracle_fn)
    del oracle  # 1.1 GB: the golden metric only needs its stored log-probabilities
    torch.manual_seed(args.seed)
    init = Gemma3(preset_config("gemma3-270m", STUDENT_ARCH))
    init_weights(init)
    init_state = {k: v.clone() for k, v in init.state_dict().items()}

    results = {"command": "python bench/teacher_hacking.py" + (" --quick" if args.quick else ""),
               "date": datetime.date.today().isoformat(), "args": vars(args),
               "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start",
               "teacher_run": os.path.relpath(args.teacher_run, REPO),
               "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
               "student_parameters": sum(p.numel() for p in init.parameters()),
               "eval_tokens": int(teacher_vs_oracle["tokens"]),
               "teacher_golden": teacher_vs_oracle["kl"] / teacher_vs_oracle["tokens"],
               "fit_points": args.fit_points, "runs": {}}
    for regime in ("offline", "online"):
        log(f"student, {regime} data")
        results["runs"][regime] = train_run(regime, regime, teacher, init_state, pool, offline, eval_batch,
                                            oracle_fn, args)
    results["minutes"] = (time.perf_counter() - t_start) / 60
    for name, r in results["runs"].items():
        u = r["golden_u"]
        log(f"{name}: golden U-shape {u['u_shape']} (min at evaluation {u['min_index']}, last "
            f"{100 * u['rise']:+.1f}% above it); proxy power-law departure at {r['departed_at']}")
    docs = Path(args.docs)
    if args.quick:
        print(markdown(results, "teacher_hacking.png"))
        return
    plot(results, docs / "teacher_hacking.png")
    (docs / "teacher_hacking.json").write_text(json.dumps(results, indent=1))
    md = docs / "distillation.md"
    replace_section(md, BEGIN, END, markdown(results, "teacher_hacking.png"), "Distillation")
    log(f"wrote {md}, {docs / 'teacher_hacking.png'}")


if __name__ == "__main__":
    main()
