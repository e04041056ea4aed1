"""Our GGUF export, loaded by llama.cpp (llama-cpp-python), gives gemmalab's greedy tokens.

    bash bench/setup_llama_cpp.sh   # once: builds and caches llama-cpp-python
    python bench/check_gguf_in_llama_cpp.py [--dtype f32] [--tokens 24]

Exports the embedded 270M (dequantized to fp32) with `save_gguf`, generates greedily with llama.cpp
and with gemmalab's fp32 path on the same prompts, and compares the token ids.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
           "Water boils at a temperature of"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "q8_0"])
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is missing: run bash bench/setup_llama_cpp.sh", file=sys.stderr)
        return 2
    import gemmalab
    from gemmalab.checkpoints.export import save_gguf

    lm = gemmalab.load()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        path = save_gguf(lm.model, lm.tokenizer, Path(tmp) / f"export-{args.dtype}.gguf", args.dtype)
        ours_lm = gemmalab.load(path) if args.dtype != "f32" else lm
        llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, verbose=False, logits_all=False)
        for prompt in PROMPTS:
            ids = lm.tokenizer.encode(prompt)
            ours = ours_lm.generate(ids, max_new_tokens=args.tokens, temperature=0).token_ids
            theirs = []
            llm.reset()
            for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                theirs.append(int(tok))
                if tok in lm.tokenizer.stop_ids or len(theirs) == args.tokens:
                    break
            same = ours == theirs
            ok &= same
            print(f"{'same' if same else 'DIFFERENT'}: {prompt!r} -> {lm.tokenizer.decode(theirs)!r}")
            if not same:
                print("  gemmalab :", ours, "\n  llama.cpp:", theirs)
    print(f"llama-cpp-python {llama_cpp.__version__}, export dtype {args.dtype}: "
          f"{'identical greedy tokens' if ok else 'tokens differ'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
