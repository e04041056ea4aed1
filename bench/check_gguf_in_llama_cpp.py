"""Our GGUF export, loaded by llama.cpp (llama-cpp-python), gives gemmalab's greedy tokens.

    bash bench/setup_llama_cpp.sh   # once: builds and caches llama-cpp-python
    python bench/check_gguf_in_llama_cpp.py [--dtype f32|f16|q8_0|q4_0|q4_0_channel] [--tokens 24]
    python bench/check_gguf_in_llama_cpp.py --file model.gguf     # any GGUF, e.g. a QAT export

Exports the embedded 270M (dequantized to fp32) with `save_gguf`, generates greedily with llama.cpp
and with gemmalab on the same prompts (the fp32 path for an f32 export, else the native quantized
path of the file's own types), and compares the token ids. Quantized files compute with 8-bit
activations in both engines, in different orders, so a greedy step whose two best tokens are nearly
tied can go either way: for every divergence the script prints the position and the fp32 logit
margin between the two engines' choices there (the file's weights dequantized, same prefix).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
           "Water boils at a temperature of", "import numpy as np\n", "class Stack:\n    def"]


def llama_greedy(llm, ids: list[int], n: int, stop_ids) -> list[int]:
    out = []
    llm.reset()
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(int(tok))
        if tok in stop_ids or len(out) == n:
            break
    return out


def divergence(fp32_lm, ids: list[int], ours: list[int], theirs: list[int]) -> dict | None:
    """Where two greedy continuations first differ, and the fp32 logits of both picks there."""
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if i is None:
        return None if len(ours) == len(theirs) else dict(position=min(len(ours), len(theirs)))
    logits = fp32_lm.logits(ids + ours[:i])[-1].float()
    top2 = logits.topk(2)
    return dict(position=i, ours=ours[i], theirs=theirs[i], logit_ours=float(logits[ours[i]]),
                logit_theirs=float(logits[theirs[i]]),
                margin=float(abs(logits[ours[i]] - logits[theirs[i]])),
                fp32_top2_gap=float(top2.values[0] - top2.values[1]))


def compare(path: Path, prompts=PROMPTS, tokens: int = 24, threads: int = 2, fp32: bool = False) -> list[dict]:
    """Per prompt: both engines' greedy tokens and, where they differ, the divergence."""
    import llama_cpp

    import gemmalab
    ours_lm = gemmalab.load(path, mode="fp32" if fp32 else "native")
    ref_lm = ours_lm if fp32 else gemmalab.load(path, mode="fp32")
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=threads, verbose=False, logits_all=False)
    rows = []
    for prompt in prompts:
        ids = ours_lm.tokenizer.encode(prompt)
        ours = list(ours_lm.generate(ids, max_new_tokens=tokens, temperature=0).token_ids)
        theirs = llama_greedy(llm, ids, tokens, ours_lm.tokenizer.stop_ids)
        rows.append(dict(prompt=prompt, ours=ours, theirs=theirs, same=ours == theirs,
                         divergence=None if ours == theirs else divergence(ref_lm, ids, ours, theirs),
                         text=ours_lm.tokenizer.decode(theirs)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "q8_0", "q4_0", "q4_0_channel"])
    ap.add_argument("--file", default=None, help="check this GGUF instead of exporting the 270M")
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is missing: run bash bench/setup_llama_cpp.sh", file=sys.stderr)
        return 2
    import gemmalab
    from gemmalab.checkpoints.export import save_gguf

    with tempfile.TemporaryDirectory() as tmp:
        if args.file:
            path, what = Path(args.file), args.file
        else:
            lm = gemmalab.load(mode="fp32")
            path = save_gguf(lm.model, lm.tokenizer, Path(tmp) / f"export-{args.dtype}.gguf", args.dtype)
            what, lm = f"export dtype {args.dtype}", None
        rows = compare(path, tokens=args.tokens, fp32=args.dtype == "f32" and not args.file)
    for r in rows:
        print(f"{'same' if r['same'] else 'DIFFERENT'}: {r['prompt']!r} -> {r['text']!r}")
        if not r["same"]:
            d = r["divergence"]
            print(f"  first divergence at generated token {d['position']}: gemmalab {d.get('ours')} "
                  f"(fp32 logit {d.get('logit_ours', float('nan')):.4f}) vs llama.cpp {d.get('theirs')} "
                  f"(fp32 logit {d.get('logit_theirs', float('nan')):.4f}): margin "
                  f"{d.get('margin', float('nan')):.4f}")
    ok = all(r["same"] for r in rows)
    print(f"llama-cpp-python {llama_cpp.__version__}, {what}: "
          f"{'identical greedy tokens' if ok else 'tokens differ'} on {sum(r['same'] for r in rows)}/{len(rows)} prompts")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
