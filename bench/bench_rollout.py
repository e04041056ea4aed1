"""Rollout throughput of a LoRA policy on the 270M: what an on-policy step (GKD, RL) spends sampling.

    python bench/bench_rollout.py [--reps 3] [--threads 2] [--out docs/post_training.md]

One invocation, interleaved, best of --reps each (the machine is shared; the load is recorded):

    native + LoRA   train.rollout.rollout() from the GGUF's own blocks + the fp32 LoRA path (the
                    adapter tied to the fp32 policy's tensors: what `gkd.sampler = "native"` samples)
    fp32 + LoRA     the same rollout() from the fp32 training model itself (rows exact: one forward
                    per row), and its fastest batched form (generate_steps: one forward for the batch)
    plain native    lm.generate on the base alone, a batch of prompts: the engine's own throughput

Workload: 4 prompts x 2 samples (8 rows), 32 new tokens, temperature 1, no top-k / top-p, no stop
token (every row samples 32 tokens); LoRA r = 16 on the seven projections with a random nonzero
adapter. Tokens/s = sampled tokens / wall seconds, prefill included. The issue's bar: native + LoRA
>= 3x fp32 sampling and >= 0.8x plain native batch throughput.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BEGIN, END = "<!-- BEGIN bench_rollout -->", "<!-- END bench_rollout -->"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
           "In 1969, the first humans"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N, NEW = 2, 32


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "docs" / "post_training.md"))
    a = p.parse_args(argv)
    import gemmalab
    from gemmalab import cpu
    from gemmalab.generate import SamplingParams, generate_steps
    from gemmalab.train.lora import apply_lora
    from gemmalab.train.roles import Roles
    from gemmalab.train.rollout import rollout

    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    fp32 = gemmalab.load(mode="fp32")
    apply_lora(fp32.model, 16, 16.0, TARGETS)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, prm in fp32.model.named_parameters():
            if "lora_b" in n:
                prm.normal_(0, 0.02, generator=g)  # nonzero: the side path really adds something
    roles = Roles(fp32.model)
    sampler = roles.attach_sampler(gemmalab.load(mode="native").model)
    plain = gemmalab.load(mode="native")
    tok = fp32.tokenizer
    prompts = [tok.encode(t) for t in PROMPTS]
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        n = fn()
        return n / (time.perf_counter() - t0)

    def native_lora():
        ro = rollout(sampler, prompts, n=N, max_new_tokens=NEW, params=params, seed=0, seq_len=64)
        return int(ro.completion_lens.sum())

    def fp32_exact():
        ro = rollout(fp32.model, prompts, n=N, max_new_tokens=NEW, params=params, seed=0, seq_len=64)
        return int(ro.completion_lens.sum())

    def fp32_batched():
        rows = [p for p in prompts for _ in range(N)]
        steps = 0
        with torch.no_grad():
            for _ in generate_steps(fp32.model, rows, NEW, SamplingParams(1.0, 0, 1.0, seed=0)):
                steps += 1
        return steps * len(rows)

    def plain_generate():
        rows = [p for p in prompts for _ in range(N)]
        out = plain.generate(rows, NEW, temperature=1.0, top_k=0, top_p=1.0, seed=0)
        return sum(len(r.token_ids) for r in out)

    runs = {"native + LoRA (rollout, fused side path)": native_lora, "fp32 + LoRA (rollout, exact rows)": fp32_exact,
            "fp32 + LoRA (generate_steps, batched)": fp32_batched, "plain native (lm.generate)": plain_generate}
    best = {k: 0.0 for k in runs}
    for _ in range(a.reps):
        for k, fn in runs.items():
            best[k] = max(best[k], timed(fn))
    load1 = os.getloadavg()
    m = cpu.describe()
    lora = best["native + LoRA (rollout, fused side path)"]
    fp32_best = max(best["fp32 + LoRA (rollout, exact rows)"], best["fp32 + LoRA (generate_steps, batched)"])
    native = best["plain native (lm.generate)"]
    lines = [BEGIN, "## Rollout throughput of a LoRA policy (bench/bench_rollout.py)", "",
             f"`python bench/bench_rollout.py --reps {a.reps}` on {m['cpu']} ({', '.join(m['flags'])}; kernels "
             f"{m['kernels']}), {datetime.date.today().isoformat()}, {a.threads} threads, best of {a.reps}, "
             f"1-min load {load0[0]:.2f} before / {load1[0]:.2f} after. 4 prompts x 2 samples, {NEW} new "
             "tokens, temperature 1, LoRA r = 16 on the seven projections.", "",
             "| sampler | tokens/s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in best.items()]
    lines += ["", f"**native + LoRA / fastest fp32 + LoRA: {lora / fp32_best:.2f}x** (goal >= 3x: "
                  f"{'met' if lora >= 3 * fp32_best else 'not met'}); **native + LoRA / plain native: "
                  f"{lora / native:.2f}x** (goal >= 0.8x: {'met' if lora >= 0.8 * native else 'not met'}).", END]
    text = "\n".join(lines)
    print(text)
    sys.path.insert(0, str(ROOT / "bench"))
    from docs_section import replace_section
    replace_section(Path(a.out), BEGIN, END, text, "Post-training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
