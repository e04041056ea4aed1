"""CPU inference benchmark: gemmalab (each mode) vs llama.cpp (llama-cpp-python) vs transformers.

    bash bench/setup_llama_cpp.sh          # once: builds llama-cpp-python (cached wheel)
    python bench/bench_inference.py        # writes docs/benchmarks.md
    python bench/bench_inference.py --long-context   # also runs a 32K-token prompt (~10 min)

Every engine loads the same GGUF (the embedded Gemma 3 270M Q4_K_M), runs with the same number of
threads (2), and is measured in its own subprocess, one after the other, in one invocation; the
table reports ratios from that run (absolute times drift on a shared machine). Decode runs ignore
end-of-sequence tokens so that every engine generates the same number of tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY_LIB = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
HELD_TEXTS = {"prose": PY_LIB / "LICENSE.txt", "code": PY_LIB / "argparse.py"}
BATCH_PROMPTS = ["The capital of France is", "def quicksort(items):", "Once upon a time, in a village",
                 "The three laws of thermodynamics are", "import numpy as np\n\n", "Dear hiring manager,",
                 "The recipe for a good bread starts with", "Question: why is the sky blue?\nAnswer:"]


def peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def prompt_ids(tokenize, n: int) -> list[int]:
    """n tokens of real text (CPython's argparse.py), BOS first."""
    text = HELD_TEXTS["code"].read_text()
    ids = tokenize(text)
    assert len(ids) >= n, len(ids)
    return ids[:n]


# ---- workers (one engine per subprocess) --------------------------------------------------------

def worker_gemmalab(mode: str, threads: int, out: dict) -> None:
    import torch

    import gemmalab
    from gemmalab.generate import SamplingParams, generate_steps, prefill
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    lm = gemmalab.load(mode=mode)
    out["load_s"] = time.perf_counter() - t0
    model = lm.model
    encode = lambda text: lm.tokenizer.encode(text, add_bos=True)  # noqa: E731
    greedy = SamplingParams(temperature=0)
    with torch.inference_mode():
        for n in (128, 2048):
            ids = prompt_ids(encode, n)
            best = float("inf")
            for _ in range(2 if n == 2048 else 3):
                cache = model.make_cache(1, n + 1)
                t = time.perf_counter()
                prefill(model, cache, torch.tensor([ids]), torch.arange(n)[None])
                best = min(best, time.perf_counter() - t)
            out[f"prefill_{n}_tok_s"] = n / best
    ids = prompt_ids(encode, 16)
    list(generate_steps(model, [ids], 8, greedy))  # warm-up
    stats: dict = {}
    list(generate_steps(model, [ids], 128, greedy, stats=stats))
    out["decode_tok_s"] = stats["decode_tok_s"]
    prompts = [encode(p) for p in BATCH_PROMPTS]
    stats = {}
    list(generate_steps(model, prompts, 128, greedy, stats=stats))
    out["batch8_tok_s"] = stats["decode_tok_s"]
    # prompt lookup on a repetitive prompt: a file, then its own beginning again
    text = HELD_TEXTS["code"].read_text()[:2500]
    rep = encode(text + "\n\n# ---- the same file, once more ----\n" + text[:300])
    plain, spec = {}, {}
    list(generate_steps(model, [rep], 128, greedy, stats=plain))
    list(generate_steps(model, [rep], 128, greedy, stats=spec, lookup=8))
    out["lookup"] = dict(plain_tok_s=plain["decode_tok_s"], lookup_tok_s=spec["decode_tok_s"],
                         drafted=spec["drafted"], accepted=spec["accepted"],
                         verify_steps=spec["verify_steps"], new_tokens=spec["new_tokens"])
    out["peak_rss"] = peak_rss()
    from gemmalab import cpu
    out["bf16_prefill"] = cpu.cpu_bf16() and mode != "fp32"
    if mode != "fp32":
        from gemmalab.quant import kernels
        out["isa"], out["pool"] = kernels.isa(), kernels.pool_stats()
    head = getattr(model.embed_tokens, "head", None)
    if head is not None:  # why batching gains little here: the LM head's cost per row at 1 and 8 rows
        ops = torch.ops.gemmalab
        for m in (1, 8):
            h = torch.randn(m, model.config.hidden_size)
            ops.qlinear(h, head.blocks, head.qtype)
            t = time.perf_counter()
            for _ in range(10):
                ops.qlinear(h, head.blocks, head.qtype)
            out[f"head_ms_{m}"] = (time.perf_counter() - t) / 10 * 1e3


def worker_llama(threads: int, out: dict) -> None:
    from llama_cpp import Llama

    from gemmalab._paths import default_model_path
    if os.environ.get("BENCH_LLAMA_NO_EXTRA_BUFTS") == "1":
        # llama.cpp's extra weight buffers (AMX, and the REPACK layouts) off: llama_model_params'
        # use_extra_bufts, which llama-cpp-python does not expose (see main() for when this is used)
        import llama_cpp
        import llama_cpp.llama as llama_module
        default_params = llama_cpp.llama_model_default_params

        def params():
            p = default_params()
            p.use_extra_bufts = False
            return p
        llama_module.llama_cpp.llama_model_default_params = params
        out["extra_bufts"] = False
    t0 = time.perf_counter()
    llm = Llama(model_path=str(default_model_path()), n_ctx=4096, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    out["load_s"] = time.perf_counter() - t0
    encode = lambda text: llm.tokenize(text.encode(), add_bos=True)  # noqa: E731
    for n in (128, 2048):
        ids = prompt_ids(encode, n)
        best = float("inf")
        for _ in range(2 if n == 2048 else 3):
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids)
            best = min(best, time.perf_counter() - t)
        out[f"prefill_{n}_tok_s"] = n / best
    ids = prompt_ids(encode, 16)
    for n_new, key in ((8, None), (128, "decode_tok_s")):
        llm.reset()
        llm.eval(ids)
        t = time.perf_counter()
        for _ in range(n_new):
            tok = llm.sample(top_k=1, temp=0.0)
            llm.eval([tok])
        if key:
            out[key] = n_new / (time.perf_counter() - t)
    out["peak_rss"] = peak_rss()


def worker_transformers(threads: int, out: dict) -> None:
    import torch
    import transformers

    from gemmalab._paths import default_model_path
    torch.set_num_threads(threads)
    path = default_model_path()
    t0 = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    out["load_s"] = time.perf_counter() - t0
    encode = lambda text: tok(text).input_ids  # noqa: E731
    with torch.inference_mode():
        for n in (128, 2048):
            ids = torch.tensor([prompt_ids(encode, n)])
            best = float("inf")
            for _ in range(2 if n == 2048 else 3):
                t = time.perf_counter()
                model(ids, use_cache=True, logits_to_keep=1)
                best = min(best, time.perf_counter() - t)
            out[f"prefill_{n}_tok_s"] = n / best
        ids = torch.tensor([prompt_ids(encode, 16)])
        gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **gen)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen)
        first = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=128, min_new_tokens=128, **gen)
        out["decode_tok_s"] = 127 / (time.perf_counter() - t - first)
        tok.padding_side = "left"
        batch = tok(BATCH_PROMPTS, return_tensors="pt", padding=True)
        t = time.perf_counter()
        model.generate(**batch, max_new_tokens=1, min_new_tokens=1, **gen)
        first = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(**batch, max_new_tokens=64, min_new_tokens=64, **gen)
        out["batch8_tok_s"] = 8 * 63 / (time.perf_counter() - t - first)
    out["peak_rss"] = peak_rss()


def worker_quality(threads: int, out: dict) -> None:
    """Teacher-forced next-token distributions of each quantized mode vs fp32 on >= 2048 tokens."""
    import torch

    import gemmalab
    torch.set_num_threads(threads)
    ref_lm = gemmalab.load(mode="fp32")
    texts = {}
    for name, path in HELD_TEXTS.items():
        ids = ref_lm.tokenizer.encode(path.read_text(), add_bos=True)[:2048]
        texts[name] = (ids, torch.log_softmax(ref_lm.logits(ids), -1))
    del ref_lm
    for mode in ("native", "q8"):
        lm = gemmalab.load(mode=mode)
        for name, (ids, ref) in texts.items():
            with torch.inference_mode():
                cache = lm.model.make_cache(1, len(ids))
                step = torch.cat([lm.model.decode_step(torch.tensor(ids[i:i + 32]),
                                                       torch.arange(i, min(i + 32, len(ids))), cache,
                                                       rows=torch.zeros(len(ids[i:i + 32]), dtype=torch.long))
                                  for i in range(0, len(ids), 32)])
            for path_name, logits in (("prefill", lm.logits(ids)), ("decode", step)):
                lp = torch.log_softmax(logits, -1)
                kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
                top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
                out[f"{mode}/{name}/{path_name}"] = dict(kl=kl, top1=top1, tokens=len(ids))


def worker_kv(threads: int, long_context: bool, out: dict) -> None:
    import torch

    import gemmalab
    from gemmalab.config import get_config
    from gemmalab.generate import prefill
    from gemmalab.model import Gemma3
    config = get_config("270m")
    T = 32768
    with torch.device("meta"):
        model = Gemma3(config)
        cache = model.make_cache(1, T)
    out["kv_32k"] = dict(measured=cache.nbytes(), formula_hybrid=config.kv_cache_bytes(T, 4),
                         formula_global=config.kv_cache_bytes(T, 4, hybrid=False))
    if long_context:
        torch.set_num_threads(threads)
        lm = gemmalab.load()
        text = "".join(p.read_text() for p in sorted(PY_LIB.glob("*.py")))
        ids = lm.tokenizer.encode(text, add_bos=True)[:T - 1]
        with torch.inference_mode():
            cache = lm.model.make_cache(1, T)
            t = time.perf_counter()
            logits = prefill(lm.model, cache, torch.tensor([ids]), torch.arange(len(ids))[None])
            elapsed = time.perf_counter() - t
            nxt = lm.model.decode_step(logits.argmax(-1), torch.tensor([len(ids)]), cache)
        out["long_context"] = dict(tokens=len(ids), prefill_s=elapsed, kv_bytes=cache.nbytes(),
                                   finite=bool(torch.isfinite(nxt).all()), peak_rss=peak_rss(),
                                   next_token=lm.tokenizer.decode([int(nxt.argmax())]))


# ---- orchestration ------------------------------------------------------------------------------

def run_worker(args: list[str], timeout: int = 3600, extra_env: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(ARGS.threads), GEMMALAB_QUIET_BUILD="1", **(extra_env or {}))
    from gemmalab.cpu import machine_load
    load = machine_load()
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        if proc.returncode < 0:
            why = f"killed by signal {-proc.returncode} ({why})"
        return {"error": why, "returncode": proc.returncode}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t
    result["load_before"] = load
    print(f"  {' '.join(args)}: done in {result['wall_s']:.0f} s", file=sys.stderr)
    return result


def fmt(x, spec=".1f", unit=""):
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def write_report(results: dict, path: Path) -> str:
    engines = [e for e in ("gemmalab native", "gemmalab native (avx512 kernels)", "gemmalab native (avx2 kernels)",
                           "gemmalab q8", "gemmalab fp32",
                           "llama.cpp", "transformers") if e in results]
    llama, v = results.get("llama.cpp", {}), results["versions"]
    lines = [
        "# CPU inference: gemmalab vs llama.cpp vs transformers",
        "",
        f"`python bench/bench_inference.py` on {results['machine']}, {results['date']}, "
        f"{ARGS.threads} threads per engine; torch {v['torch']}, llama-cpp-python "
        f"{v.get('llama_cpp', 'n/a')}, transformers {v.get('transformers', 'n/a')}. Model: the "
        "embedded Gemma 3 270M Q4_K_M GGUF for every engine. Each engine ran in its own process, one "
        "after the other, in the same invocation; ratios are within this run.",
        "",
        f"CPU: {results['cpu']['cpu']} ({results['cpu']['id']}), flags {', '.join(results['cpu']['flags'])}. "
        f"gemmalab kernels: {results['cpu']['kernels']} (the best variant this CPU runs; the "
        "'avx2 kernels' row forces the baseline with GEMMALAB_ISA=avx2, the 'avx512 kernels' row, on "
        "AMX machines, the AVX-512 VNNI variant); bf16 prefill products "
        f"(quantized modes, more than 32 rows): {'on' if results['cpu']['bf16'] else 'off'}. "
        f"llama.cpp: {results.get('llama_system_info', 'n/a')}. Machine load before each engine "
        "(1-minute load average): " + ", ".join(
            f"{e} {results[e]['load_before'].get('loadavg_1m', 0):.2f}" for e in
            ("gemmalab native", "gemmalab native (avx512 kernels)", "gemmalab native (avx2 kernels)",
             "llama.cpp")
            if e in results and "load_before" in results[e]) + ".",
        "",
        "| engine | load (s) | prefill 128 (tok/s) | prefill 2048 (tok/s) | decode (tok/s) | batch-8 decode (tok/s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in engines:
        r = results[e]
        if "error" in r:
            lines.append(f"| {e} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {e} | {fmt(r.get('load_s'), '.2f')} | {fmt(r.get('prefill_128_tok_s'))} | "
                     f"{fmt(r.get('prefill_2048_tok_s'))} | {fmt(r.get('decode_tok_s'))} | "
                     f"{fmt(r.get('batch8_tok_s'))} | {fmt(r.get('peak_rss', 0) / 2**20, '.0f')} |")
    lines += ["", "Ratios against llama.cpp (same run):", "",
              "| engine | prefill 128 | prefill 2048 | decode | peak RSS |", "|---|---|---|---|---|"]
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "n/a"  # noqa: E731
    for e in engines:
        r = results[e]
        if "error" in r or e == "llama.cpp" or "error" in llama:
            continue
        lines.append(f"| {e} | {ratio(r.get('prefill_128_tok_s'), llama.get('prefill_128_tok_s'))} | "
                     f"{ratio(r.get('prefill_2048_tok_s'), llama.get('prefill_2048_tok_s'))} | "
                     f"{ratio(r.get('decode_tok_s'), llama.get('decode_tok_s'))} | "
                     f"{ratio(r.get('peak_rss'), llama.get('peak_rss'))} |")
    nat = results.get("gemmalab native", {})
    if "decode_tok_s" in nat and "batch8_tok_s" in nat:
        lines += ["", f"Batch-8 decode throughput / single-stream decode (gemmalab native): "
                      f"**{nat['batch8_tok_s'] / nat['decode_tok_s']:.2f}x**."]
        for name in ("avx512", "avx2"):
            other = results.get(f"gemmalab native ({name} kernels)", {})
            if "batch8_tok_s" in other and "decode_tok_s" in other:
                lines[-1] += f" With the {name} kernels: {other['batch8_tok_s'] / other['decode_tok_s']:.2f}x."
        if "head_ms_8" in nat:
            lines += ["", f"The int8 LM head (262,144 x 640, Q8_0) takes {nat['head_ms_1']:.1f} ms for 1 row and "
                          f"{nat['head_ms_8']:.1f} ms for 8 rows ({nat['head_ms_8'] / 8:.1f} ms per row) "
                          f"with the {nat.get('isa', '?')} kernels: one row reads the weights once "
                          "(memory-bound), eight rows are bound by the integer dot products and their "
                          "per-block fp32 scaling."]
    if "lookup" in nat:
        lk = nat["lookup"]
        lines += ["", "Prompt-lookup speculative decoding (gemmalab native, greedy, 128 new tokens, a "
                      "prompt that ends by starting to repeat itself, up to 8 drafts per step): "
                      f"{lk['plain_tok_s']:.1f} -> {lk['lookup_tok_s']:.1f} tok/s, **{lk['lookup_tok_s'] / lk['plain_tok_s']:.2f}x**; "
                      f"{lk['accepted']}/{lk['drafted']} draft tokens accepted, "
                      f"{lk['verify_steps']} model passes for {lk['new_tokens']} tokens; identical output."]
    q = results.get("quality", {})
    if q and "error" not in q:
        lines += ["", "Quality of the quantized modes against fp32 (the file's weights dequantized), "
                      "teacher-forced on 2048 tokens; `prefill` = `lm.logits` (long prompts: dequantized "
                      "weights, " + ("bf16 products with fp32 accumulation on this CPU"
                                     if results.get("cpu", {}).get("bf16") else "fp32 products") +
                      "), `decode` = the fused decode kernels (8-bit activations, as every "
                      "generated token is computed):", "",
                  "| mode | text | path | top-1 agreement | mean KL (nats) |", "|---|---|---|---|---|"]
        for key in sorted(k for k in q if "/" in k):
            mode, text, p = key.split("/")
            lines.append(f"| {mode} | {text} | {p} | {q[key]['top1']:.2%} | {q[key]['kl']:.4f} |")
    kv = results.get("kv", {}).get("kv_32k")
    if kv:
        lines += ["", f"KV cache at 32K tokens (fp32): hybrid {kv['measured'] / 2**20:.1f} MiB "
                      f"(spec 7.2 formula {kv['formula_hybrid'] / 2**20:.1f} MiB, "
                      f"{kv['measured'] / kv['formula_hybrid'] - 1:+.1%}: {32} ring slots of headroom "
                      f"for speculative decoding) vs all-global {kv['formula_global'] / 2**20:.1f} MiB "
                      f"({kv['formula_global'] / kv['measured']:.1f}x)."]
    lc = results.get("kv", {}).get("long_context")
    if lc:
        lines += ["", f"Long context: a {lc['tokens']}-token prompt ran to completion in "
                      f"{lc['prefill_s']:.0f} s ({lc['tokens'] / lc['prefill_s']:.0f} tok/s), KV cache "
                      f"{lc['kv_bytes'] / 2**20:.1f} MiB, peak RSS {lc['peak_rss'] / 2**20:.0f} MB, "
                      f"next-token logits finite: {lc['finite']}."]
    if results.get("notes"):
        lines += ["", *results["notes"]]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    results: dict = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}"}
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        results["machine"] = f"{cpu} ({os.cpu_count()} cores visible)"
    except (OSError, StopIteration):
        pass
    import torch
    versions = results["versions"] = {"torch": torch.__version__}
    try:
        import llama_cpp
        versions["llama_cpp"] = llama_cpp.__version__
    except ImportError:
        results["notes"] = ["llama-cpp-python is not installed: run bash bench/setup_llama_cpp.sh."]
    import transformers
    versions["transformers"] = transformers.__version__
    from gemmalab import cpu
    results["cpu"] = cpu.describe()
    try:
        import llama_cpp
        results["llama_system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    except Exception:  # noqa: BLE001
        pass
    jobs = [("gemmalab native", ["gemmalab", "native"], None)]
    from gemmalab.quant import kernels
    if "amx" in kernels.supported_isas():
        jobs.append(("gemmalab native (avx512 kernels)", ["gemmalab", "native"], {"GEMMALAB_ISA": "avx512"}))
    if cpu.avx512_supported():
        jobs.append(("gemmalab native (avx2 kernels)", ["gemmalab", "native"], {"GEMMALAB_ISA": "avx2"}))
    jobs += [("gemmalab q8", ["gemmalab", "q8"], None), ("gemmalab fp32", ["gemmalab", "fp32"], None)]
    if "llama_cpp" in versions:
        jobs.append(("llama.cpp", ["llama"], None))
    if not ARGS.skip_transformers:
        jobs.append(("transformers", ["transformers"], None))
    jobs += [("quality", ["quality"], None),
             ("kv", ["kv"] + (["--long-context"] if ARGS.long_context else []), None)]
    for name, args, env in jobs:
        if ARGS.only and name not in ARGS.only:
            continue
        print(f"running {name} ...", file=sys.stderr)
        results[name] = run_worker(args, extra_env=env)
        if name == "llama.cpp" and results[name].get("returncode", 0) < 0:
            # On an AMX Xeon VM (family 6 model 167) llama.cpp 0.3.36's AMX buffers crash
            # (SIGSEGV in llama_decode for batches of >= 16 tokens); measure it without them.
            crash = results[name]["error"]
            print("llama.cpp crashed; again without its extra weight buffers ...", file=sys.stderr)
            results[name] = run_worker(args, extra_env={"BENCH_LLAMA_NO_EXTRA_BUFTS": "1"})
            results.setdefault("notes", []).append(
                f"llama.cpp with its default weight buffers crashed here ({crash}); its row is with "
                "use_extra_bufts = false, which turns off its AMX buffers and its REPACK layouts "
                "(llama.cpp's own AVX-512 VNNI kernels on the GGUF blocks).")
    out = Path(ARGS.out)
    print(write_report(results, out))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--long-context", action="store_true", help="also run a 32K-token prompt")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--only", nargs="*", help="engines to run (names as in the table)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"),
                   help="the report (Markdown; the results go next to it as .json)")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ARGS = p.parse_args()
    if ARGS.worker:
        kind, rest, res = ARGS.worker[0], ARGS.worker[1:], {}
        if kind == "gemmalab":
            worker_gemmalab(rest[0], ARGS.threads, res)
        elif kind == "llama":
            worker_llama(ARGS.threads, res)
        elif kind == "transformers":
            worker_transformers(ARGS.threads, res)
        elif kind == "quality":
            worker_quality(ARGS.threads, res)
        elif kind == "kv":
            worker_kv(ARGS.threads, ARGS.long_context, res)
        print(json.dumps(res))
    else:
        main()
