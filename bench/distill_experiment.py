"""Pre-training distillation at equal student tokens: next-token CE vs Gemma 3 sampled-256 vs
full-vocabulary KD vs top-256 KD, from the real Gemma 3 270M into a small Gemma 3 student.

    nice -n 19 python bench/distill_experiment.py            # the full run (~60 min on 2 shared cores)
    python bench/distill_experiment.py --quick               # the same pipeline in a few minutes

What it does, with the library's own commands (each stage is skipped when its output exists, so an
interrupted experiment continues where it stopped):

1. data: the CPython standard-library sources on this machine (Lib/*.py), one record per file; every
   8th file (sorted by name) is held out.
2. teacher: `gemmalab distill cache` runs the 270M once over the training rows (K = 256 ids sampled
   with replacement + fp16 probabilities + counts) and also keeps its full fp16 log-probabilities,
   which the full-KD and top-256 runs need (the store is shared by all runs); the same for the
   held-out rows, whose full log-probabilities give KL(teacher || student).
3. students: `gemmalab train distill` once per method, the same initialisation, the same batches in
   the same order (one pass over the stored rows), evaluated on the held-out rows every few steps.
4. report: curves against student tokens (docs/distillation_curves.png), a table, the machine and
   the times, written between the markers of docs/distillation.md and to
   docs/distillation_experiment.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's gemmalab, whatever is installed

from docs_section import replace_section  # noqa: E402  (bench/, the script's directory)

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
BEGIN, END = "<!-- BEGIN experiment: bench/distill_experiment.py -->", "<!-- END experiment -->"

# The student: the Gemma 3 architecture (5:1-style local/global layers with a sliding window, QK-norm,
# GeGLU, tied embeddings) at a size this CPU can train, with the teacher's tokenizer and 262k vocabulary.
STUDENT_ARCH = {"hidden_size": 64, "num_hidden_layers": 4,
                "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                "query_pre_attn_scalar": 32, "intermediate_size": 256, "sliding_window": 64}

METHODS = {  # name -> (label, [distill] section)
    "ce": ("(a) next-token CE", {"loss": "ce"}),
    "sampled": ("(b) Gemma 3 sampled-256", {"loss": "sampled", "k": 256, "weighting": "renormalized",
                                            "normalizer": "vocab"}),
    "full": ("(c) full-vocabulary KD", {"loss": "full"}),
    "topk": ("(d) top-256 KD", {"loss": "topk", "k": 256}),
    # extras (--methods): the unbiased importance-weighted variant, the sampled-set normaliser
    "importance": ("(e) sampled-256, counts/K (RS-KD)", {"loss": "sampled", "k": 256,
                                                         "weighting": "importance"}),
    "sampled_set": ("(f) sampled-256, sampled-set softmax", {"loss": "sampled", "k": 256,
                                                             "normalizer": "sampled"}),
}


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def write_data(work: Path) -> tuple[Path, Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))
    if not files:
        sys.exit(f"no Python sources under {lib}")
    train, held = work / "data" / "train.jsonl", work / "data" / "heldout.jsonl"
    if not (train.exists() and held.exists()):
        train.parent.mkdir(parents=True, exist_ok=True)
        with open(train, "w") as ft, open(held, "w") as fh:
            for i, f in enumerate(files):
                text = f.read_text(encoding="utf-8", errors="replace")
                (fh if i % 8 == 3 else ft).write(json.dumps({"text": text}) + "\n")
    return train, held


def run(cmd: list[str], what: str) -> float:
    log(f"{what}: {' '.join(cmd[1:] if cmd[0] == sys.executable else cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=ENV)
    if proc.returncode:
        sys.exit(f"{what} failed (exit {proc.returncode})")
    return time.perf_counter() - t0


def cache(data: Path, out: Path, tokens: int, args) -> dict:
    manifest = out / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        if m["totals"]["targets"] >= tokens or m["complete"]:
            return m
    run([sys.executable, "-m", "gemmalab", "distill", "cache", "--data", str(data), "--out", str(out),
         "--k", "256", "--seq-len", str(args.seq_len), "--max-tokens", str(tokens), "--full-logprobs",
         "--rows-per-shard", str(args.rows_per_shard), "--threads", str(args.threads)],
        f"teacher cache {out.name}")
    return json.loads(manifest.read_text())


def student_config(work: Path, name: str, steps: int, args) -> dict:
    return {"model": {"preset": "gemma3-270m", "arch": STUDENT_ARCH},
            "data": {"batch_size": args.batch},
            "optim": {"lr": args.lr, "warmup_steps": max(1, steps // 16), "min_lr_ratio": 0.1,
                      "weight_decay": 0.0, "grad_clip": 1.0},
            "distill": {"mode": "offline", "store": str(work / "store-train"), **METHODS[name][1]},
            "eval": {"store": str(work / "store-heldout"), "every": max(1, steps // args.evals),
                     "batch_size": 2},
            "run": {"out_dir": str(work / f"run-{name}"), "steps": steps, "seed": 0, "log_every": 1,
                    "save_every": max(1, steps // 4), "keep_checkpoints": 1, "threads": args.threads}}


def initial_eval(work: Path, cfg_raw: dict) -> dict:
    """Held-out metrics of the common initialisation (step 0 of every curve)."""
    out = work / "eval-init.json"
    if out.exists():
        return json.loads(out.read_text())
    import torch
    from gemmalab.train.config import DistillConfig, build_config
    from gemmalab.train.recipes.distill import evaluate_on_store, tokenizer_of
    from gemmalab.train.logit_store import LogitStore
    from gemmalab.train.build import build_model_and_tokenizer
    torch.set_num_threads(cfg_raw["run"]["threads"])
    cfg = build_config(cfg_raw, DistillConfig)
    held = LogitStore(cfg.eval.store)
    model, _ = build_model_and_tokenizer(cfg, torch.device("cpu"), tokenizer_of(held.teacher_path))
    m = evaluate_on_store(model, held, batch_size=2)
    out.write_text(json.dumps(m))
    return m


def teacher_heldout_ce(store_dir: Path) -> float:
    """The 270M's own held-out next-token cross-entropy, from its stored log-probabilities."""
    import torch
    from gemmalab.train.logit_store import LogitStore
    store = LogitStore(store_dir)
    total, n = 0.0, 0
    for s, e in enumerate(store.shards):
        b = store.rows(s, 0, e["rows"])
        t = b["targets"]
        valid = t != -100
        lp = b["teacher_logprobs"][valid]  # (n, V) fp16
        total -= float(lp.gather(1, t[valid][:, None]).float().sum())
        n += int(valid.sum())
    return total / max(1, n)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results["runs"].items():
        xs = [p["tokens"] for p in r["curve"]]
        axes[0].plot(xs, [p["eval_ce"] for p in r["curve"]], marker="o", ms=3, label=r["label"])
        axes[1].plot(xs, [p["eval_kl"] for p in r["curve"]], marker="o", ms=3, label=r["label"])
    axes[0].axhline(results["teacher_heldout_ce"], color="gray", ls="--", lw=1, label="teacher (270M)")
    axes[0].set_title("held-out next-token cross-entropy (nats/token)")
    axes[1].set_title("held-out KL(teacher || student) (nats/token)")
    for ax in axes:
        ax.set_xlabel("student training tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Distilling Gemma 3 270M into a {results['student_parameters'] / 1e6:.1f}M-parameter "
                 f"Gemma 3 student ({results['train_tokens']:,} tokens of CPython stdlib source)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict, png: str) -> str:
    m, tr, he = results["machine"], results["store_train"], results["store_heldout"]
    lines = [BEGIN, "",
             f"Produced by `{results['command']}` on {results['date']}: {m['cpu']}, {m['cores']} cores "
             f"(shared with other jobs; load average at the start {m['load_average'][0]:.1f}), "
             f"torch {m['torch']}; teacher caches + student runs {results['wall_minutes']:.0f} min "
             f"(this invocation {results['invocation_minutes']:.0f} min).", "",
             f"* Teacher: Gemma 3 270M (embedded Q4_K_M GGUF, fp32 compute). Student: Gemma 3 architecture, "
             f"{results['student_parameters'] / 1e6:.2f}M parameters ({results['student_parameters_non_embedding'] / 1e3:.0f}k "
             f"outside the 262,144 x 64 embedding), 4 layers (3 sliding-window of 64 + 1 global), "
             f"d_model 64, the teacher's tokenizer.",
             f"* Data: CPython {platform.python_version()} `Lib/*.py`, packed rows of {results['seq_len']} tokens; "
             f"{results['train_tokens']:,} training target tokens ({results['train_rows']} rows), "
             f"{results['heldout_tokens']:,} held-out target tokens from held-out files.",
             f"* Every run: the same initialisation and batches ({results['batch']} row(s) = "
             f"{results['batch'] * results['seq_len']} tokens per step, {results['steps']} steps, one pass), "
             f"AdamW lr {results['lr']}, warmup then cosine to 10%.",
             f"* Teacher cache, one pass shared by all runs: {tr['targets']:,} tokens in {tr['seconds'] / 60:.1f} min "
             f"({tr['targets'] / tr['seconds']:.1f} tok/s); sampled-256 targets take "
             f"{tr['sparse_bytes_per_token']:,.0f} bytes/token (int32 ids + fp16 probs + int16 counts), "
             f"the full fp16 log-probabilities {tr['full_bytes_per_token'] / 1024:,.0f} KiB/token "
             f"(store {tr['bytes'] / 2**30:.2f} GiB).", "",
             "| method | held-out CE (nats/token) | KL(teacher ‖ student) | student tokens | run wall time "
             "(with evaluations) | training tokens/s |",
             "|---|---|---|---|---|---|"]
    init = results["initial"]
    lines.append(f"| initialisation | {init['eval_ce']:.3f} | {init['eval_kl']:.3f} | 0 | | |")
    for name, r in results["runs"].items():
        last = r["curve"][-1]
        lines.append(f"| {r['label']} | {last['eval_ce']:.3f} | {last['eval_kl']:.3f} | {last['tokens']:,} | "
                     f"{r['seconds'] / 60:.1f} min | {r['train_tokens_per_s']:.1f} |")
    lines.append(f"| teacher (270M) | {results['teacher_heldout_ce']:.3f} | 0 | | | |")
    lines += ["", f"![curves]({png})", "", "Per evaluation point (student tokens: held-out CE / KL):", ""]
    names = list(results["runs"])
    lines.append("| tokens | " + " | ".join(results["runs"][n]["label"] for n in names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    for i, p in enumerate(results["runs"][names[0]]["curve"]):
        cells = []
        for n in names:
            c = results["runs"][n]["curve"]
            cells.append(f"{c[i]['eval_ce']:.3f} / {c[i]['eval_kl']:.3f}" if i < len(c) else "")
        lines.append(f"| {p['tokens']:,} | " + " | ".join(cells) + " |")
    lines += ["", END]
    return "\n".join(lines)


def write_docs(results: dict, docs: Path) -> None:
    png = docs / "distillation_curves.png"
    plot(results, png)
    (docs / "distillation_experiment.json").write_text(json.dumps(results, indent=1))
    if results["quick"]:
        print(markdown(results, png.name))
        return
    md = docs / "distillation.md"
    section = markdown(results, png.name)
    replace_section(md, BEGIN, END, section, "Distillation")
    log(f"wrote {md} and {png}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "runs" / "distill-experiment"), help="working directory")
    p.add_argument("--docs", default=str(REPO / "docs"))
    p.add_argument("--train-tokens", type=int, default=16384)
    p.add_argument("--heldout-tokens", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="rows per step")
    p.add_argument("--rows-per-shard", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--evals", type=int, default=8, help="evaluation points per run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default="ce,sampled,full,topk", help=f"of {','.join(METHODS)}")
    p.add_argument("--quick", action="store_true", help="2,048 training tokens: checks the pipeline")
    args = p.parse_args()
    if args.quick:  # outputs stay in the working directory, docs/ is left alone
        args.train_tokens, args.heldout_tokens, args.evals = 2048, 256, 2
        args.work = args.work + "-quick"
        args.docs = args.work
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    info = machine()
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        sys.exit(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")

    train_data, held_data = write_data(work)
    m_held = cache(held_data, work / "store-heldout", args.heldout_tokens, args)
    m_train = cache(train_data, work / "store-train", args.train_tokens, args)
    rows = m_train["totals"]["rows"]
    steps = rows // args.batch  # one pass over the stored rows (shards hold a multiple of batch rows)

    results = {"command": "python bench/distill_experiment.py" + (" --quick" if args.quick else ""),
               "date": datetime.date.today().isoformat(), "machine": info, "quick": args.quick,
               "seq_len": args.seq_len, "batch": args.batch, "steps": steps, "lr": args.lr,
               "train_rows": rows, "train_tokens": m_train["totals"]["targets"],
               "heldout_tokens": m_held["totals"]["targets"], "runs": {}}
    V, K = m_train["targets"]["vocab_size"], m_train["targets"]["k"]
    sparse = K * (4 + 2 + 2)  # per position: int32 id, fp16 prob, int16 count
    results["store_train"] = {"targets": m_train["totals"]["targets"], "bytes": m_train["totals"]["bytes"],
                              "seconds": m_train["totals"]["teacher_seconds"],
                              "sparse_bytes_per_token": sparse * rows * args.seq_len / m_train["totals"]["targets"],
                              "full_bytes_per_token": V * 2 * rows * args.seq_len / m_train["totals"]["targets"]}
    results["store_heldout"] = {"targets": m_held["totals"]["targets"], "bytes": m_held["totals"]["bytes"],
                                "seconds": m_held["totals"]["teacher_seconds"]}
    results["teacher_heldout_ce"] = teacher_heldout_ce(work / "store-heldout")
    base_cfg = student_config(work, methods[0], steps, args)
    results["initial"] = initial_eval(work, base_cfg)
    from gemmalab.train.build import preset_config
    arch = preset_config("gemma3-270m", STUDENT_ARCH)
    results["student_parameters"] = arch.embedding_parameters + arch.non_embedding_parameters
    results["student_parameters_non_embedding"] = arch.non_embedding_parameters

    for name in methods:
        cfg = student_config(work, name, steps, args)
        out = Path(cfg["run"]["out_dir"])
        cfg_path = work / f"config-{name}.json"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        timing = out / "wall_seconds.json"
        if not timing.exists():
            resume = ["--resume"] if (out / "checkpoints" / "latest").exists() else []
            seconds = run([sys.executable, "-m", "gemmalab", "train", "distill", str(cfg_path),
                           "--no-progress", *resume], f"student {name}")
            timing.write_text(json.dumps(seconds))
        rows_m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        curve = [{"tokens": 0, **results["initial"]}] + [
            {"tokens": r["tokens"], "eval_ce": r["eval_ce"], "eval_kl": r["eval_kl"], "loss": r["loss"]}
            for r in rows_m if "eval_ce" in r]
        step_tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + rows_m, rows_m)]
        train_seconds = sum(n / max(1e-9, r["tokens_per_s"]) for n, r in zip(step_tokens, rows_m))
        results["runs"][name] = {"label": METHODS[name][0], "seconds": json.loads(timing.read_text()),
                                 "train_tokens_per_s": rows_m[-1]["tokens"] / train_seconds,
                                 "curve": curve, "train_loss": [[r["tokens"], r["loss"]] for r in rows_m]}
        last = curve[-1]
        log(f"{name}: held-out CE {last['eval_ce']:.3f}, KL {last['eval_kl']:.3f} after {last['tokens']:,} tokens")
    # the stages' own times (a resumed experiment's invocation would undercount): teacher + students
    results["wall_minutes"] = (results["store_train"]["seconds"] + results["store_heldout"]["seconds"]
                               + sum(r["seconds"] for r in results["runs"].values())) / 60
    results["invocation_minutes"] = (time.perf_counter() - t_start) / 60
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    write_docs(results, Path(args.docs))


if __name__ == "__main__":
    main()
