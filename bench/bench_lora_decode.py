"""Decode tokens/s of the 270M with a LoRA policy (r=16 on q, k, v, o, gate, up, down), as a rollout
samples it: plain native, native + LoRA on the fused C++ step (the side paths inside
ops.decode_layer), native + LoRA on the op-by-op step `_adapter_decode` (the path before the side
paths moved into C++, forced here), and fp32 + LoRA. 1 stream and a batch of 8, 32 new tokens each,
greedy; the four are interleaved and each keeps its best of `reps` (the machine is shared). Prints a
Markdown table with the CPU and the load before and after.

    python bench/bench_lora_decode.py [reps] [threads]
"""
import contextlib
import os
import sys

import torch

import gemmalab
from gemmalab import cpu
from gemmalab._paths import default_model_path
from gemmalab.generate import SamplingParams, generate_steps
from gemmalab.quant import model as quant_model
from gemmalab.train.lora import apply_lora, lora_modules
from gemmalab.train.roles import Roles

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
           "The quick brown fox jumps over", "In 1969, the first humans", "import numpy as np\n",
           "Water boils at a temperature of", "My favourite recipe for bread is"]
NEW = 32


@contextlib.contextmanager
def op_by_op():
    """decode_step takes `_adapter_decode` for LoRA factors too (as it did before they were fused)."""
    saved = quant_model._fused_factors
    quant_model._fused_factors = lambda plan: None
    try:
        yield
    finally:
        quant_model._fused_factors = saved


def tok_s(lm, batch):
    prompts = [lm.tokenizer.encode(p, add_bos=True) for p in PROMPTS[:batch]]
    stats = {}
    for _ in generate_steps(lm.model, prompts, NEW, SamplingParams(temperature=0), stats=stats):
        pass
    return stats["decode_tok_s"]


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    path = default_model_path()
    fp32 = gemmalab.load(path, mode="fp32")
    native = gemmalab.load(path, mode="native")  # the sampler: LoRA tied to fp32's adapters
    plain = gemmalab.load(path, mode="native")
    apply_lora(fp32.model, 16, 16.0, TARGETS)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(fp32.model).values():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.02)
    Roles(fp32.model).attach_sampler(native.model)
    runs = {"native": lambda b: tok_s(plain, b),
            "native + LoRA, fused": lambda b: tok_s(native, b),
            "native + LoRA, op by op (`_adapter_decode`)": lambda b: _op_by_op(native, b),
            "fp32 + LoRA": lambda b: tok_s(fp32, b)}
    best: dict = {}
    for name in runs:  # warm-up (kernel load, first allocations)
        runs[name](1)
    for rep in range(reps):
        for batch in (1, 8):
            for name, run in runs.items():
                t = run(batch)
                best[name, batch] = max(best.get((name, batch), 0.0), t)
                print(f"rep {rep} batch {batch} {name}: {t:.1f} tok/s", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    d = cpu.describe()
    print(f"\n{d['cpu']} ({d['id']}), kernels {d['kernels']}, {threads} threads, best of {reps}, "
          f"{NEW} new tokens; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n")
    print("| path | batch 1 tok/s | batch 8 tok/s | vs fp32 + LoRA (1 / 8) | vs native (1 / 8) |")
    print("|---|---|---|---|---|")
    for name in runs:
        r = [best[name, b] for b in (1, 8)]
        vf = [best[name, b] / best["fp32 + LoRA", b] for b in (1, 8)]
        vn = [best[name, b] / best["native", b] for b in (1, 8)]
        print(f"| {name} | {r[0]:.1f} | {r[1]:.1f} | {vf[0]:.2f}x / {vf[1]:.2f}x | "
              f"{vn[0]:.2f}x / {vn[1]:.2f}x |")


def _op_by_op(lm, batch):
    with op_by_op():
        return tok_s(lm, batch)


if __name__ == "__main__":
    main()
