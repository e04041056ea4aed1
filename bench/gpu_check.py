"""GPU check (run where CUDA is available): fp32 and bf16 parity with transformers, cache, generation.

    python bench/gpu_check.py [--out docs/gpu.md]

Uses tiny random configs (no weights need to travel) and a 270M-shaped random model for a decode
timing. Compares against transformers' Gemma3ForCausalLM / Gemma2ForCausalLM on the same GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemmalab.config import get_config  # noqa: E402
from gemmalab.generate import SamplingParams, generate_steps  # noqa: E402
from gemmalab.model import Gemma3  # noqa: E402
from tests.hf_reference import hf_model, our_state_dict  # noqa: E402


def parity(name: str, dtype: torch.dtype, device: str) -> dict:
    config = get_config(name)
    ref = hf_model(config).to(device=device, dtype=dtype)
    ours = Gemma3(config)
    ours.load_state_dict(our_state_dict(ref.float()))
    ref = ref.to(dtype)
    ours = ours.to(device=device, dtype=dtype).eval()
    T = 5 * config.sliding_window + 3
    ids = torch.randint(0, config.vocab_size, (2, T), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).float(), ref(ids).logits.float()
        cache = ours.make_cache(2, T)
        steps = [ours(ids[:, :2 * config.sliding_window + 1], cache=cache)]
        steps += [ours(ids[:, t:t + 1], cache=cache) for t in range(2 * config.sliding_window + 1, T)]
        c = torch.cat(steps, 1).float()
    scale = b.abs().max().item()
    return dict(model=name, dtype=str(dtype).split(".")[-1], vs_transformers=(a - b).abs().max().item(),
                cache_vs_nocache=(c - a).abs().max().item(), logit_scale=scale,
                finite=bool(torch.isfinite(a).all()))


def decode_speed(device: str, dtype: torch.dtype, batch: int, new: int = 128) -> float:
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma3(get_config("270m")).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    prompts = [[2] + list(range(1000, 1100))] * batch
    params = SamplingParams(temperature=0)
    for _ in generate_steps(model, prompts, 8, params):  # warm-up
        pass
    torch.cuda.synchronize()
    stats: dict = {}
    for _ in generate_steps(model, prompts, new, params, stats=stats):
        pass
    torch.cuda.synchronize()
    return stats["decode_tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    import transformers
    rows = [parity(n, d, "cuda") for n in ("tiny", "tiny-27b-style", "tiny-gemma2")
            for d in (torch.float32, torch.bfloat16)]
    lines = [f"# GPU check: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}", "",
             "| model | dtype | max abs diff vs transformers | cached vs no-cache | max logit | finite |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['vs_transformers']:.2e} | "
                     f"{r['cache_vs_nocache']:.2e} | {r['logit_scale']:.2f} | {r['finite']} |")
    lines += ["", "Eager decode of a 270M-shaped model (random weights), greedy, 128 new tokens:", "",
              "| dtype | batch | tok/s |", "|---|---|---|"]
    for dtype in (torch.bfloat16, torch.float32):
        for batch in (1, 8):
            lines.append(f"| {str(dtype).split('.')[-1]} | {batch} | "
                         f"{decode_speed('cuda', dtype, batch):.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    fp32 = [r for r in rows if r["dtype"] == "float32"]
    assert all(r["vs_transformers"] <= 1e-4 * max(1.0, r["logit_scale"]) for r in fp32), fp32
    assert all(r["finite"] for r in rows)


if __name__ == "__main__":
    main()
