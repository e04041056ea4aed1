"""The full-size Gemma 3 vision encoder (SigLIP So400m/14 at 896 px, random weights, fp32) on one image:
gemmalab vs transformers' SiglipVisionModel with the same config and weights, in one run.

    nice -n 19 python bench/bench_vision.py [--repeats 2] [--threads 2] [--out docs/vision.md]

The weights are made once (transformers' initialisation, seed 0) and saved to a temporary
safetensors file; every forward pass then runs in a fresh subprocess that loads them, so that its
peak memory is its own, and the passes alternate A B B A so that the load from other jobs on a
shared machine falls on both alike. Peak memory is the process's VmHWM, reset after loading
(/proc/self/clear_refs), so it is the resident weights plus what the forward pass adds. Both
compute attention with PyTorch's scaled_dot_product_attention (transformers' default "sdpa").
The outputs are compared (max abs difference of the (4096, 1152) patch embeddings).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # benchmark the checkout this script is in
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, os, sys, time
import torch
which, folder, threads, repeats, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
layers = int(sys.argv[6])
torch.set_num_threads(threads)

def rss_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

t0 = time.perf_counter()
if which == "transformers":
    import transformers
    model = transformers.SiglipVisionModel.from_pretrained(folder, dtype=torch.float32).eval()
    run = lambda x: model(pixel_values=x).last_hidden_state
else:
    sys.path.insert(0, os.getcwd())
    from safetensors.torch import load_file
    import dataclasses
    from gemmalab.config import SIGLIP_SO400M
    from gemmalab.model.vision import SiglipVisionEncoder
    state = {}
    for k, v in load_file(os.path.join(folder, "model.safetensors")).items():
        k = k.removeprefix("vision_model.")
        if k.startswith("head."):
            continue
        state[k.removeprefix("embeddings.").removeprefix("encoder.")] = v
    with torch.device("meta"):
        model = SiglipVisionEncoder(dataclasses.replace(SIGLIP_SO400M, num_hidden_layers=layers))
    model.load_state_dict(state, assign=True, strict=True)
    model.eval()
    run = model
with torch.inference_mode():  # fault in memory-mapped weights, so both start fully resident
    sum(float(p.float().sum()) for p in model.parameters())
load_s = time.perf_counter() - t0
x = torch.rand(1, 3, 896, 896, generator=torch.Generator().manual_seed(0)) * 2 - 1
before = rss_mb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
times, cpu = [], []
with torch.inference_mode():
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        y = run(x)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
torch.save(y[0].clone(), out)
print(json.dumps(dict(load_s=load_s, times=times, cpu=cpu, rss_before_mb=before,
                      peak_mb=rss_mb("VmHWM"))))
"""


def measure(which: str, folder: str, threads: int, repeats: int, out: str, layers: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, which, folder, str(threads), str(repeats),
                           out, str(layers)], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{which} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="forward passes per implementation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/vision.md")
    ap.add_argument("--layers", type=int, default=27, help="fewer blocks for a quick smoke run")
    args = ap.parse_args()

    import torch
    import transformers

    import dataclasses

    from gemmalab.config import SIGLIP_SO400M

    c = dataclasses.replace(SIGLIP_SO400M, num_hidden_layers=args.layers)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        config = transformers.SiglipVisionConfig(
            hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            image_size=c.image_size, patch_size=c.patch_size, layer_norm_eps=c.layer_norm_eps,
            vision_use_head=False)
        transformers.SiglipVisionModel(config).save_pretrained(tmp)
        print(f"random weights made and saved in {time.perf_counter() - t0:.0f} s", flush=True)
        # One pass per process, interleaved A B B A ... so that a change in what else runs on the
        # machine falls on both implementations alike.
        results = {w: dict(times=[], cpu=[], rss_before_mb=0.0, peak_mb=0.0)
                   for w in ("gemmalab", "transformers")}
        order = ["gemmalab", "transformers"]
        for r in range(args.repeats):
            for which in order if r % 2 == 0 else order[::-1]:
                print(f"pass {r + 1}: {which} ...", flush=True)
                m = measure(which, tmp, args.threads, 1, f"{tmp}/{which}.pt", args.layers)
                print(json.dumps(m), flush=True)
                res = results[which]
                res["times"] += m["times"]
                res["cpu"] += m["cpu"]
                res["rss_before_mb"] = max(res["rss_before_mb"], m["rss_before_mb"])
                res["peak_mb"] = max(res["peak_mb"], m["peak_mb"])
        diff = (torch.load(f"{tmp}/gemmalab.pt") - torch.load(f"{tmp}/transformers.pt")).abs().max()

    params = c.num_parameters
    flops = 2 * params * c.num_patches + 4 * c.num_hidden_layers * c.num_patches ** 2 * c.hidden_size
    rows = []
    for which, r in results.items():
        best = min(r["times"])
        rows.append(f"| {which} | {best:.1f} | {statistics.median(r['times']):.1f} | "
                    f"{min(r['cpu']):.1f} | {flops / best / 1e9:.0f} | "
                    f"{r['rss_before_mb'] / 1024:.2f} | {r['peak_mb'] / 1024:.2f} | "
                    f"{(r['peak_mb'] - r['rss_before_mb']) / 1024:.2f} |")
    ratio = min(results["transformers"]["times"]) / min(results["gemmalab"]["times"])
    cpu_ratio = min(results["transformers"]["cpu"]) / min(results["gemmalab"]["cpu"])
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    table = "\n".join([
        "| implementation | best wall s | median wall s | best CPU s | GFLOP/s (wall) | "
        "RSS before GiB | peak GiB | forward adds GiB |",
        "|---|---|---|---|---|---|---|---|", *rows])
    print()
    print(table)
    print(f"\ntransformers / gemmalab: wall {ratio:.2f}x, CPU {cpu_ratio:.2f}x; "
          f"max |difference| of the outputs: {diff:.2e}")
    doc = f"""# Vision encoder: time and memory on CPU

`python bench/bench_vision.py --repeats {args.repeats} --threads {args.threads}` (run under
`nice -n 19` on a shared machine: {cpu}, torch {torch.__version__}, transformers
{transformers.__version__}).

The full-size Gemma 3 vision encoder, SigLIP So400m/14 at 896 px ({params / 1e6:.1f}M parameters,
{c.num_hidden_layers} blocks over 4,096 patches; about {flops / 1e12:.1f} TFLOP per image), fp32, random weights
(transformers' initialisation, the same for both), one 896 x 896 image, {args.threads} threads.
Each forward pass runs in its own process, alternating A B B A between the implementations; the
weights are made resident first, then VmHWM is reset, so the peak is the resident weights plus what
the forward pass adds (the largest of the passes). Pooling and projection (not timed)
are negligible next to the encoder.

{table}

- transformers / gemmalab: **{ratio:.2f}x** in wall time, **{cpu_ratio:.2f}x** in CPU time (best
  of {args.repeats} each). CPU time (user + system of the process) is the steadier figure on a
  machine shared with other jobs. Both call PyTorch's `scaled_dot_product_attention`.
- Max abs difference of the outputs (4096 x 1152 patch embeddings): {diff:.1e}.
- Times on this shared 2-core machine vary with what else runs; compare the two rows of one run,
  not runs on different days. A Gemma 3 prompt pays this once per image (and once more per Pan &
  Scan crop).
"""
    Path(args.out).write_text(doc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
