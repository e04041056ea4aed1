"""Evaluation vs llama.cpp: perplexity parity and throughput, passkey answers on identical prompts.

    bash bench/setup_llama_cpp.sh        # once: builds llama-cpp-python (cached wheel)
    python bench/bench_eval.py           # writes its section of docs/eval.md

Perplexity: the llama-perplexity protocol (ctx 512, BOS overwrite, second half scored) on the same
token ids (gemmalab's tokenization of CPython's pydoc topics; llama.cpp's tokenizer splits some
whitespace runs differently, so each engine gets the identical ids instead of the text):
- gemmalab fp32 (the Q4_K_M file dequantized) vs llama.cpp on an F32 GGUF export of exactly those
  weights: the acceptance bar is a relative PPL difference <= 1%;
- gemmalab native vs llama.cpp on the Q4_K_M file itself: tokens scored per second, same run.
llama.cpp is driven through llama-cpp-python's low-level batch API with logits requested for the
scored half only, as llama-perplexity does; its time counts the decode calls only (the numpy
log-softmax afterwards is excluded), which favours llama.cpp. gemmalab's time counts everything.
Passkey: llama.cpp's examples/passkey prompts over length x depth, the same ids to both engines,
greedy continuations of 8 tokens compared token for token and by the number they contain.
Each engine runs in its own subprocess, one after the other, with the same threads.

`--parts binary --llama-perplexity PATH` also runs llama.cpp's own `llama-perplexity` tool, which
tokenizes the file itself, on the longest prefix of whole lines of the same text on which
llama.cpp's tokenization equals gemmalab's; gemmalab reads the same file. llama-cpp-python builds
only the libraries; the tool builds from the llama.cpp it vendors:
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build build --target llama-perplexity     # ~15 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
CACHE = ROOT / "bench" / ".cache"
F32 = CACHE / "gemma3-270m-f32.gguf"
CTX = 512


def text_ids(n_chunks: int) -> list[int]:
    from pydoc_data.topics import topics

    from gemmalab._paths import default_model_path
    from gemmalab.checkpoints import gguf as g
    from gemmalab.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(g.open_gguf(default_model_path()))
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok.encode(text, add_bos=True)
    return ids[:max(2 * CTX, n_chunks * CTX)]


def ensure_f32() -> Path:
    if not F32.exists():
        import gemmalab
        from gemmalab.checkpoints.export import save_gguf
        lm = gemmalab.load(mode="fp32")
        CACHE.mkdir(parents=True, exist_ok=True)
        save_gguf(lm.model, lm.tokenizer, F32, "f32")
    return F32


# ---- workers ------------------------------------------------------------------------------------

def worker_gemmalab_ppl(mode: str, n_chunks: int, threads: int, out: dict) -> None:
    import torch

    import gemmalab
    from gemmalab.eval.perplexity import perplexity
    torch.set_num_threads(threads)
    lm = gemmalab.load(mode=mode)
    ids = text_ids(n_chunks)
    perplexity(lm, ids[:2 * CTX], ctx=CTX, chunks=1)  # warm-up (kernel pools, allocator)
    r = perplexity(lm, ids, ctx=CTX, chunks=n_chunks)
    out.update(ppl=r["ppl"], ppl_stderr=r["ppl_stderr"], tokens_scored=r["tokens_scored"],
               seconds=r["seconds"], tokens_per_second=r["tokens_per_second"], mode=lm.mode)
    from gemmalab.cpu import summary
    out["cpu"] = summary()


def worker_llama_ppl(path: str, n_chunks: int, threads: int, out: dict) -> None:
    import llama_cpp
    import numpy as np
    ids = text_ids(n_chunks)
    llm = llama_cpp.Llama(model_path=path, n_ctx=CTX, n_batch=CTX, n_ubatch=CTX, n_threads=threads,
                          n_threads_batch=threads, logits_all=False, verbose=False)
    from llama_chunks import decode_chunk  # bench/, the script's directory
    first = CTX // 2
    batch = llama_cpp.llama_batch_init(CTX, 0, 1)
    n = min(n_chunks, len(ids) // CTX)
    nll, decode_s = [], 0.0
    for c in range(-1, n):  # chunk -1: warm-up, not scored
        chunk = list(ids[max(c, 0) * CTX:(max(c, 0) + 1) * CTX])
        chunk[0] = llm.token_bos()
        lg, dt = decode_chunk(llm, batch, chunk, first)
        if c < 0:
            continue
        decode_s += dt
        m = lg.max(1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(lg - m).sum(1)))
        nll += (lse - lg[np.arange(CTX - 1 - first), chunk[first + 1:]]).tolist()
    x = np.array(nll)
    ppl = float(np.exp(x.mean()))
    err = ppl * float(np.sqrt((np.mean(x * x) - x.mean() ** 2) / (x.size - 1)))
    out.update(ppl=ppl, ppl_stderr=err, tokens_scored=int(x.size), seconds=decode_s,
               tokens_per_second=x.size / decode_s)
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    mine = llm.tokenize(text.encode(), add_bos=True)[:len(ids)]
    out["same_tokenization"] = mine == ids
    out["first_tokenization_difference"] = next((i for i, (a, b) in enumerate(zip(mine, ids)) if a != b), None)


PASSKEY_LENGTHS = (1024, 2048, 4096, 8192)
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)


def passkey_cases():
    import random

    from gemmalab._paths import default_model_path
    from gemmalab.checkpoints import gguf as g
    from gemmalab.eval.long_context import passkey_case
    from gemmalab.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(g.open_gguf(default_model_path()))
    rng = random.Random(0)
    return [passkey_case(tok, L, d, rng.randint(1, 50000)) for L in PASSKEY_LENGTHS
            for d in PASSKEY_DEPTHS]


def worker_gemmalab_passkey(mode: str, threads: int, out: dict) -> None:
    import torch

    import gemmalab
    from gemmalab.eval.long_context import greedy_with_logprob
    torch.set_num_threads(threads)
    lm = gemmalab.load(mode=mode)
    rows = []
    for case in passkey_cases():
        t0 = time.perf_counter()
        toks, lp = greedy_with_logprob(lm.model, case["ids"], lm.tokenizer.encode(f" {case['key']}"), 8)
        rows.append(dict(length=case["length"], depth=case["depth"], key=case["key"],
                         prompt_tokens=len(case["ids"]), tokens=toks, text=lm.tokenizer.decode(toks),
                         key_logprob=lp, seconds=time.perf_counter() - t0))
    out["rows"] = rows


def worker_llama_passkey(threads: int, out: dict) -> None:
    from llama_cpp import Llama

    from gemmalab._paths import default_model_path
    llm = Llama(model_path=str(default_model_path()), n_ctx=max(PASSKEY_LENGTHS) + 64, n_batch=512,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    rows = []
    for case in passkey_cases():
        t0 = time.perf_counter()
        llm.reset()
        llm.eval(case["ids"])
        toks = []
        while len(toks) < 8:
            tok = llm.sample(top_k=1, temp=0.0)
            toks.append(int(tok))
            if tok == llm.token_eos():
                break
            llm.eval([tok])
        rows.append(dict(length=case["length"], depth=case["depth"], key=case["key"], tokens=toks,
                         text=llm.detokenize(toks).decode(errors="replace"),
                         seconds=time.perf_counter() - t0))
    out["rows"] = rows


def agreeing_text() -> Path:
    """The longest prefix of whole lines of the pydoc text that both tokenizers split alike."""
    import llama_cpp
    from pydoc_data.topics import topics

    from gemmalab._paths import default_model_path
    from gemmalab.checkpoints import gguf as g
    from gemmalab.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(g.open_gguf(default_model_path()))
    llm = llama_cpp.Llama(model_path=str(default_model_path()), vocab_only=True, verbose=False)
    lines = "\n\n".join(topics[k] for k in sorted(topics)).split("\n")

    def agree(n):
        t = "\n".join(lines[:n]) + "\n"
        return tok.encode(t, add_bos=True) == llm.tokenize(t.encode(), add_bos=True)
    lo, hi = 10, len(lines)
    while hi - lo > 1:  # agreement is checked again on the result below
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if agree(mid) else (lo, mid)
    if not agree(lo):
        raise SystemExit("no prefix of the text tokenizes alike in both engines")
    path = CACHE / "agree.txt"
    path.write_text("\n".join(lines[:lo]) + "\n")
    return path


def run_llama_perplexity(binary: str, model: Path, text: Path, threads: int) -> dict:
    import re
    env = dict(os.environ, LD_LIBRARY_PATH=str(Path(binary).resolve().parent))
    t0 = time.perf_counter()
    p = subprocess.run([binary, "-m", str(model), "-f", str(text), "-c", str(CTX), "-b", str(CTX),
                        "-t", str(threads)], capture_output=True, text=True, timeout=3600, env=env)
    out = p.stdout + p.stderr
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out)
    if p.returncode != 0 or not m:
        raise SystemExit(f"llama-perplexity failed: {out[-2000:]}")
    running = [float(x) for x in re.findall(r"\[\d+\]([\d.]+),", out)]
    return dict(ppl=float(m.group(1)), ppl_stderr=float(m.group(2)), running_ppl=running,
                seconds=time.perf_counter() - t0)


def worker_gemmalab_file(mode: str, path: str, threads: int, out: dict) -> None:
    import torch

    import gemmalab
    from gemmalab.eval.perplexity import perplexity, read_text
    torch.set_num_threads(threads)
    r = perplexity(gemmalab.load(mode=mode), read_text(path), ctx=CTX)
    out.update({k: r[k] for k in ("ppl", "ppl_stderr", "running_ppl", "tokens_scored", "seconds")})


def run_worker(args: list[str], threads: int, timeout: int = 7200) -> dict:
    from gemmalab.cpu import machine_load
    load = machine_load()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), GEMMALAB_QUIET_BUILD="1")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", *args, "--threads", str(threads)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"worker {args} failed")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["load_before"] = load
    print(f"  {' '.join(args)}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return r


def _int(text):
    import re
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def report(res: dict) -> str:
    lines = [f"Run {res.get('date', date.today())} on {res['cpu']}, {res['threads']} "
             f"threads, load average before each engine in the JSON. `python bench/bench_eval.py`.\n"]
    if "ppl" in res:
        p = res["ppl"]
        g32, l32, gn, ln = p["gemmalab_fp32"], p["llama_f32"], p["gemmalab_native"], p["llama_q4km"]
        rel = abs(g32["ppl"] - l32["ppl"]) / l32["ppl"]
        lines += [f"### Perplexity, ctx {CTX}, {g32['tokens_scored']} tokens scored "
                  f"({g32['tokens_scored'] // (CTX // 2 - 1)} chunks of pydoc topics, identical ids)\n",
                  "| engine | weights | PPL | +/- | tokens scored / s |", "|---|---|---|---|---|",
                  f"| gemmalab fp32 | Q4_K_M dequantized | {g32['ppl']:.4f} | {g32['ppl_stderr']:.4f} | "
                  f"{g32['tokens_per_second']:.1f} |",
                  f"| llama.cpp | F32 export of those weights | {l32['ppl']:.4f} | {l32['ppl_stderr']:.4f} | "
                  f"{l32['tokens_per_second']:.1f} |",
                  f"| gemmalab native | Q4_K_M | {gn['ppl']:.4f} | {gn['ppl_stderr']:.4f} | "
                  f"{gn['tokens_per_second']:.1f} |",
                  f"| llama.cpp | Q4_K_M | {ln['ppl']:.4f} | {ln['ppl_stderr']:.4f} | "
                  f"{ln['tokens_per_second']:.1f} |", "",
                  f"- PPL, gemmalab fp32 vs llama.cpp F32: relative difference **{100 * rel:.3f}%** "
                  f"(bar: <= 1%).",
                  f"- Throughput, same Q4_K_M run: gemmalab native / llama.cpp = "
                  f"**{gn['tokens_per_second'] / ln['tokens_per_second']:.2f}x** (bar: >= 1.2x); "
                  f"fp32 vs F32: {g32['tokens_per_second'] / l32['tokens_per_second']:.2f}x.",
                  f"- llama.cpp's own tokenization of the same text equals gemmalab's: "
                  f"{l32['same_tokenization']} (first difference at token "
                  f"{l32['first_tokenization_difference']}), which is why both get the same ids.\n"]
    if "binary" in res:
        b = res["binary"]
        lines += [f"### The llama-perplexity tool itself, ctx {CTX} "
                  f"({b['gemmalab_fp32']['tokens_scored']} tokens scored: the first "
                  f"{b['text_lines']} lines of pydoc topics, where both tokenizations agree)\n",
                  "| | llama-perplexity | gemmalab eval perplexity | relative difference |",
                  "|---|---|---|---|"]
        for name, g, l in (("F32 export / fp32", b["gemmalab_fp32"], b["llama_f32"]),
                           ("Q4_K_M / native", b["gemmalab_native"], b["llama_q4km"])):
            lines.append(f"| {name} | {l['ppl']:.4f} +/- {l['ppl_stderr']:.5f} | {g['ppl']:.4f} +/- "
                         f"{g['ppl_stderr']:.5f} | {100 * abs(g['ppl'] - l['ppl']) / l['ppl']:.3f}% |")
        lines += ["", "Running estimates per chunk (llama-perplexity's `[1]x,[2]y`): llama.cpp F32 "
                  + ", ".join(f"{x:.4f}" for x in b["llama_f32"]["running_ppl"]) + "; gemmalab fp32 "
                  + ", ".join(f"{x:.4f}" for x in b["gemmalab_fp32"]["running_ppl"]) + ".\n"]
    if "passkey" in res:
        ours, theirs = res["passkey"]["gemmalab"]["rows"], res["passkey"]["llama"]["rows"]
        same_tok = sum(a["tokens"] == b["tokens"] for a, b in zip(ours, theirs))
        same_ans = sum(_int(a["text"]) == _int(b["text"]) for a, b in zip(ours, theirs))
        lines += [f"### Passkey (llama.cpp examples/passkey format), gemmalab {res['passkey']['mode']} "
                  "vs llama.cpp, Q4_K_M, greedy 8 tokens\n",
                  "| length | depth | prompt tokens | key | gemmalab | llama.cpp | same answer |",
                  "|---|---|---|---|---|---|---|"]
        for a, b in zip(ours, theirs):
            lines.append(f"| {a['length']} | {a['depth']} | {a['prompt_tokens']} | {a['key']} | "
                         f"{a['text'].strip()!r} | {b['text'].strip()!r} | "
                         f"{'yes' if _int(a['text']) == _int(b['text']) else '**no**'} |")
        lines += ["", f"- answers equal on **{same_ans}/{len(ours)}** prompts (bar: all up to 8K); "
                      f"the 8 greedy tokens identical on {same_tok}/{len(ours)}; gemmalab correct on "
                      f"{sum(_int(a['text']) == a['key'] for a in ours)}/{len(ours)}.\n"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--parts", default="ppl,passkey")
    ap.add_argument("--passkey-mode", default="native")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--llama-perplexity", default=os.environ.get("LLAMA_PERPLEXITY"),
                    help="path of a built llama-perplexity (for --parts binary)")
    args = ap.parse_args()
    if args.worker:
        out: dict = {}
        kind, *rest = args.worker
        if kind == "gemmalab_ppl":
            worker_gemmalab_ppl(rest[0], int(rest[1]), args.threads, out)
        elif kind == "llama_ppl":
            worker_llama_ppl(rest[0], int(rest[1]), args.threads, out)
        elif kind == "gemmalab_passkey":
            worker_gemmalab_passkey(rest[0], args.threads, out)
        elif kind == "gemmalab_file":
            worker_gemmalab_file(rest[0], rest[1], args.threads, out)
        elif kind == "llama_passkey":
            worker_llama_passkey(args.threads, out)
        print(json.dumps(out))
        return
    from gemmalab._paths import default_model_path
    from gemmalab.cpu import summary
    res: dict = dict(threads=args.threads, cpu=summary(), date=str(date.today()))
    parts = args.parts.split(",")
    saved = ROOT / "docs" / "eval_bench.json"
    if saved.exists() and not args.no_docs:  # keep the parts not rerun this time
        old = json.loads(saved.read_text())
        res.update({k: old[k] for k in ("ppl", "binary", "passkey") if k in old and k not in parts})
    if "ppl" in parts:
        f32 = ensure_f32()
        n = str(args.chunks)
        res["ppl"] = dict(
            gemmalab_fp32=run_worker(["gemmalab_ppl", "fp32", n], args.threads),
            llama_f32=run_worker(["llama_ppl", str(f32), n], args.threads),
            gemmalab_native=run_worker(["gemmalab_ppl", "native", n], args.threads),
            llama_q4km=run_worker(["llama_ppl", str(default_model_path()), n], args.threads))
    if "binary" in parts:
        if not args.llama_perplexity:
            raise SystemExit("--parts binary needs --llama-perplexity PATH (see the docstring)")
        f32, text = ensure_f32(), agreeing_text()
        res["binary"] = dict(
            text_lines=text.read_text().count("\n"),
            llama_f32=run_llama_perplexity(args.llama_perplexity, f32, text, args.threads),
            gemmalab_fp32=run_worker(["gemmalab_file", "fp32", str(text)], args.threads),
            llama_q4km=run_llama_perplexity(args.llama_perplexity, default_model_path(), text,
                                            args.threads),
            gemmalab_native=run_worker(["gemmalab_file", "native", str(text)], args.threads))
    if "passkey" in parts:
        res["passkey"] = dict(mode=args.passkey_mode,
                              gemmalab=run_worker(["gemmalab_passkey", args.passkey_mode], args.threads),
                              llama=run_worker(["llama_passkey"], args.threads))
    text = report(res)
    print(text)
    if not args.no_docs:
        from docs_section import replace_section
        (ROOT / "docs" / "eval_bench.json").write_text(json.dumps(res, indent=1) + "\n")
        replace_section(ROOT / "docs" / "eval.md", "<!-- BEGIN bench_eval -->", "<!-- END bench_eval -->",
                        "<!-- BEGIN bench_eval -->\n" + text + "\n<!-- END bench_eval -->", "Evaluation")


if __name__ == "__main__":
    main()
