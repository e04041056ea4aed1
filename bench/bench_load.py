"""Load time and peak memory of the embedded Gemma 3 270M GGUF: gemmalab vs transformers, one run.

    python bench/bench_load.py [--repeats 3] [--skip-transformers] [--out docs/load.md]

Each measurement runs in a fresh subprocess (so imports and peak RSS are its own), 2 threads.
'load' is the call itself (file -> ready model + tokenizer); 'import' is the library import before it.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
t0 = time.perf_counter()
import torch
torch.set_num_threads(2)
which, path = sys.argv[1], sys.argv[2]
if which == "gemmalab":
    import gemmalab
    t1 = time.perf_counter()
    lm = gemmalab.load(path, mode="fp32")  # fp32 vs fp32; bench_inference times each mode
    t2 = time.perf_counter()
    ids = lm.tokenizer.encode("The capital of France is")
    logits = lm.logits(ids)
else:
    import transformers
    t1 = time.perf_counter()
    p = os.path.abspath(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(p), gguf_file=os.path.basename(p), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p))
    t2 = time.perf_counter()
    ids = tok("The capital of France is").input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(dict(import_s=t1 - t0, load_s=t2 - t1, peak_rss_mb=rss,
                      top1=int(logits[-1].argmax()))))
"""


def measure(which: str, path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, path], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", default="docs/load.md")
    args = ap.parse_args()

    from gemmalab._paths import default_model_path
    path = str(default_model_path())
    rows = {}
    for which in ["gemmalab"] + ([] if args.skip_transformers else ["transformers"]):
        runs = [measure(which, path) for _ in range(args.repeats if which == "gemmalab" else 1)]
        rows[which] = dict(load_s=statistics.median(r["load_s"] for r in runs),
                           import_s=statistics.median(r["import_s"] for r in runs),
                           peak_rss_mb=max(r["peak_rss_mb"] for r in runs), top1=runs[0]["top1"],
                           runs=len(runs))
        print(which, rows[which], flush=True)

    lines = [
        "# Loading the embedded Gemma 3 270M (Q4_K_M GGUF)", "",
        f"`python bench/bench_load.py` on {platform.machine()}, {time.strftime('%Y-%m-%d')}, 2 threads, "
        "fp32 weights, each run in a fresh process.", "",
        "| library | load (s) | import (s) | peak RSS (MB) | runs |", "|---|---|---|---|---|"]
    for which, r in rows.items():
        lines.append(f"| {which} | {r['load_s']:.2f} | {r['import_s']:.2f} | {r['peak_rss_mb']:.0f} "
                     f"| {r['runs']} |")
    if "transformers" in rows:
        g, t = rows["gemmalab"], rows["transformers"]
        lines += ["", f"gemmalab loads {t['load_s'] / g['load_s']:.1f}x faster than transformers "
                  f"(same file, same run); both predict the same next token: {g['top1'] == t['top1']}."]
    lines += ["", "'load' = file to ready model and tokenizer (the GGUF dequantized to fp32); "
              "transformers' figure includes building its tokenizer from the same GGUF."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
