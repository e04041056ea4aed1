"""Decode under background load: gemmalab native vs llama.cpp, side by side, same loads.

    python bench/bench_contention.py [--threads 2] [--tokens 128] [--repeats 3]   # writes docs/contention.md

Loads (each started before the engine's process and killed after it):
- none: a quiet machine;
- busy core: one Python process spinning on one core;
- torch 2-thread job: a process running 1024 x 1024 fp32 matmuls on 2 threads (its OpenMP workers
  spin between products, as a training job beside a server would).
Engines, each in its own process with the same thread count: gemmalab native (guided chunks on
torch's OpenMP team, alone while the cores are busy: gemmalab/quant/csrc/pool.h), gemmalab native with
GEMMALAB_POOL=static (the previous static at::parallel_for slices, for comparison) and llama.cpp
(llama-cpp-python, built by bench/setup_llama_cpp.sh). Each engine decodes `--tokens` greedy tokens
after a 16-token prompt, `--repeats` times; the median tok/s is reported. The CPU, the kernel variant
and the machine load are recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from docs_section import replace_section  # noqa: E402

LOADS = {
    "none": None,
    "busy core": "while True: pass",
    "torch 2-thread job": ("import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\n"
                           "while True: a @ a"),
}
PROMPT = "def parse_arguments(argv):\n    \"\"\"Parse the command line."


def worker_gemmalab(args) -> dict:
    import torch

    import gemmalab
    from gemmalab.generate import SamplingParams, generate_steps
    from gemmalab.quant import kernels
    torch.set_num_threads(args.threads)
    lm = gemmalab.load(mode="native")
    ids = lm.tokenizer.encode(PROMPT, add_bos=True)
    greedy = SamplingParams(temperature=0)
    list(generate_steps(lm.model, [ids], 8, greedy))
    kernels.reset_pool_stats()
    rates = []
    for _ in range(args.repeats):
        st: dict = {}
        list(generate_steps(lm.model, [ids], args.tokens, greedy, stats=st))
        rates.append(st["decode_tok_s"])
    return dict(tok_s=statistics.median(rates), runs=rates, isa=kernels.isa(), pool=kernels.pool_stats())


def worker_llama(args) -> dict:
    from llama_cpp import Llama

    from gemmalab._paths import default_model_path
    llm = Llama(model_path=str(default_model_path()), n_ctx=1024, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=True)
    rates = []
    for rep in range(args.repeats + 1):
        llm.reset()
        llm.eval(ids)
        n = 8 if rep == 0 else args.tokens
        t = time.perf_counter()
        for _ in range(n):
            llm.eval([llm.sample(top_k=1, temp=0.0)])
        if rep:
            rates.append(n / (time.perf_counter() - t))
    return dict(tok_s=statistics.median(rates), runs=rates)


def machine_load() -> dict:
    sys.path.insert(0, str(ROOT))
    from gemmalab.cpu import machine_load as ml
    return ml()


def run(engine: str, load: str) -> dict:
    hog = None
    if LOADS[load]:
        hog = subprocess.Popen([sys.executable, "-c", LOADS[load]], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        time.sleep(2.0)
    env = dict(os.environ, GEMMALAB_QUIET_BUILD="1")
    env.pop("GEMMALAB_POOL", None)
    kind = engine
    if engine == "gemmalab (static slices)":
        env["GEMMALAB_POOL"], kind = "static", "gemmalab"
    elif engine == "gemmalab":
        kind = "gemmalab"
    try:
        before = machine_load()
        p = subprocess.run([sys.executable, __file__, "--worker", kind, "--threads", str(ARGS.threads),
                            "--tokens", str(ARGS.tokens), "--repeats", str(ARGS.repeats)],
                           capture_output=True, text=True, env=env, timeout=1800)
        after = machine_load()
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["load_before"], out["load_after"] = before, after
    return out


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from gemmalab import cpu
    engines = ["gemmalab", "gemmalab (static slices)", "llama.cpp"]
    results: dict = {"date": str(date.today()), "machine": cpu.describe(), "threads": ARGS.threads,
                     "tokens": ARGS.tokens, "runs": {}}
    for load in LOADS:
        for engine in engines:
            print(f"{load} / {engine} ...", file=sys.stderr, flush=True)
            results["runs"][f"{load}|{engine}"] = r = run(engine, load)
            print(f"  {r.get('tok_s', r.get('error'))}", file=sys.stderr, flush=True)
    m = results["machine"]
    lines = [f"`python bench/bench_contention.py` on {m['cpu']} ({m['id']}; {', '.join(m['flags'])}), "
             f"{results['date']}, {ARGS.threads} threads per engine, gemmalab kernels {m['kernels']}. "
             f"Greedy decode of {ARGS.tokens} tokens after a 16-token prompt, median of {ARGS.repeats}; "
             "each engine in its own process, beside the background load named in the row (started "
             "2 s before it). Machine load before each run: 1-minute load average / runnable tasks.", "",
             "| background load | gemmalab native (tok/s) | gemmalab, static slices | llama.cpp | gemmalab / llama.cpp | solo steps (gemmalab) | load avg before |",
             "|---|---|---|---|---|---|---|"]
    for load in LOADS:
        g, s, ll = (results["runs"][f"{load}|{e}"] for e in engines)
        ratio = f"{g['tok_s'] / ll['tok_s']:.2f}x" if "tok_s" in g and "tok_s" in ll else "n/a"
        solo = (f"{g['pool']['solo_jobs']} / {g['pool']['jobs']}" if "pool" in g else "n/a")
        lb = g.get("load_before", {})
        lines.append(f"| {load} | {g.get('tok_s', 0):.1f} | {s.get('tok_s', 0):.1f} | {ll.get('tok_s', 0):.1f} | "
                     f"**{ratio}** | {solo} | {lb.get('loadavg_1m', 0):.2f} / {lb.get('procs_running', '?')} |")
    text = "\n".join(lines)
    print(text)
    begin, end = "<!-- bench_contention:begin -->", "<!-- bench_contention:end -->"
    replace_section(ROOT / "docs" / "contention.md", begin, end, f"{begin}\n{text}\n{end}",
                    "Decode under background load")
    (ROOT / "docs" / "contention.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ARGS = ap.parse_args()
    if ARGS.worker:
        print(json.dumps(worker_gemmalab(ARGS) if ARGS.worker == "gemmalab" else worker_llama(ARGS)))
    else:
        main()
