"""API fuzzing of `gemmalab serve` from its own OpenAPI schema, and its section of docs/reliability.md.

Starts a real `gemmalab serve` subprocess on 127.0.0.1 (a free port), runs schemathesis against
/openapi.json (every operation, positive and negative data: the examples, coverage and fuzzing
phases) with the checks below, then checks that the server is still alive, answers a normal chat
request, and has every KV-cache row free again (none leaked by a failed or cancelled request).

Checks (schemathesis's names, plus two of ours, registered when schemathesis imports this module as
its hooks module, SCHEMATHESIS_HOOKS=fuzz_server):
- not_a_server_error: no 5xx, ever;
- status_code_conformance, content_type_conformance, response_schema_conformance,
  response_headers_conformance: each response is one the schema declares, with its declared body;
- openai_error_body (ours): every 4xx/5xx body is OpenAI's {"error": {"message", "type", "param",
  "code"}} with a non-empty message;
- recorder (ours): logs each response (operation, status, generation mode, seconds) for the counts.

The model is a random tiny Gemma 3 (8 layers, width 64, a 512-piece tokenizer: the one the tests
build, tests/distill_helpers.tiny_teacher_gguf) by default, so that a case that generates a whole
context of tokens still takes well under a second; --model 270m fuzzes the embedded 270M instead.

    python bench/fuzz_server.py                     # the long run (-n 1000 per operation, 13 min at most)
    python bench/fuzz_server.py -n 50 --no-docs     # a quick one
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gemmalab.cpu import cpu_family, cpu_model

ROOT = Path(__file__).resolve().parents[1]
DOCS_JSON = ROOT / "docs" / "reliability" / "server_fuzz.json"
MD = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- BEGIN fuzz_server -->", "<!-- END fuzz_server -->"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance,openai_error_body,recorder")
RECORD_ENV = "GEMMALAB_FUZZ_RECORD"
# Server limits for the fuzz: a context of 512 tokens (the tiny model's) bounds every case's
# max_tokens, and n is at most --max-batch; a case cannot run for long.
SERVER_FLAGS = ("--max-batch", "16", "--max-context", "512", "--max-queue", "64", "--timeout", "120")


# ---- the checks (loaded into the schemathesis process as its hooks module) ------------------------

def openai_error_problem(status: int, body: bytes | str, content_type: str) -> str | None:
    """Why a 4xx/5xx response is not an OpenAI-shaped error (None when it is, or when it is not an error)."""
    if status < 400:
        return None
    if not content_type.startswith("application/json"):
        return f"a {status} with Content-Type {content_type!r}, not application/json"
    try:
        data = json.loads(body)
    except ValueError:
        return f"a {status} whose body is not JSON"
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        return f"a {status} whose body is not {{'error': {{message, type, param, code}}}}: {str(data)[:200]}"
    if not isinstance(err["message"], str) or not err["message"] or "\n" in err["message"]:
        return f"a {status} whose error message is not one non-empty line: {err['message']!r:.200}"
    if not isinstance(err["type"], str) or not all(v is None or isinstance(v, str) for v in (err["param"], err["code"])):
        return f"a {status} whose error type/param/code are not strings (or null): {err}"
    return None


def _register_checks() -> None:
    import schemathesis

    @schemathesis.check
    def openai_error_body(ctx, response, case):
        """Every 4xx/5xx body is OpenAI's error object."""
        problem = openai_error_problem(response.status_code, response.content,
                                       (response.headers.get("content-type") or [""])[0])
        if problem:
            raise AssertionError(problem)

    lock = threading.Lock()
    path = os.environ[RECORD_ENV]

    @schemathesis.check
    def recorder(ctx, response, case):
        """Logs every response for the per-operation counts (never fails)."""
        mode = getattr(getattr(getattr(case, "meta", None), "generation", None), "mode", None)
        phase = getattr(getattr(getattr(case, "meta", None), "phase", None), "name", None)
        param = None
        if response.status_code >= 400:
            try:
                param = json.loads(response.content)["error"]["param"]
            except (ValueError, KeyError, TypeError):
                pass
        ctype = response.headers.get("content-type") or [""]
        problem = openai_error_problem(response.status_code, response.content, ctype[0])
        row = {"op": case.operation.label, "status": response.status_code, "param": param, "bad_error": problem,
               "mode": getattr(mode, "value", str(mode)), "phase": getattr(phase, "value", str(phase)),
               "s": round(response.elapsed, 4)}
        with lock, open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


if os.environ.get(RECORD_ENV) and "schemathesis" in sys.modules:
    _register_checks()


# ---- the server ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(path: Path) -> Path:
    """The random tiny Gemma 3 GGUF the tests use (built in a fraction of a second)."""
    sys.path.insert(0, str(ROOT))
    from tests.distill_helpers import tiny_teacher_gguf
    return tiny_teacher_gguf(path)


class Server:
    """`gemmalab serve` in a subprocess on 127.0.0.1; its output is kept in `lines`."""

    def __init__(self, model: str | None, *flags: str, wait: float = 300.0):
        import httpx
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "gemmalab", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               *(["--model", model] if model else []), *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.time() + wait
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + "".join(self.lines[-30:]))
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.model_name = httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not start: " + "".join(self.lines[-30:]))

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def tracebacks(self) -> list[str]:
        """Server log lines that start a Python traceback (an exception the server logged)."""
        return [line for line in self.lines if line.startswith("Traceback")]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def alive_after(server: Server, max_batch: int = 16, settle: float = 60.0) -> dict:
    """The server still runs, answers a normal chat request, and has every cache row free again."""
    import httpx
    out = {"process_running": server.proc.poll() is None}
    deadline = time.time() + settle
    health = {}
    while time.time() < deadline:  # cancelled / disconnected requests free their rows within a step
        health = httpx.get(server.url + "/health", timeout=10).json()
        if health["running"] == health["prefilling"] == health["waiting"] == 0 and health["free_rows"] == max_batch:
            break
        time.sleep(0.2)
    out["health"] = health
    out["no_leaked_rows"] = health.get("free_rows") == max_batch and health.get("running") == 0
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": server.model_name, "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4, "temperature": 0})
    out["chat_status"] = r.status_code
    out["chat_ok"] = r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    out["ok"] = out["process_running"] and out["no_leaked_rows"] and out["chat_ok"]
    return out


# ---- schemathesis -----------------------------------------------------------------------------------

def schemathesis_version() -> str:
    from importlib.metadata import version
    return version("schemathesis")


def run_schemathesis(url: str, max_examples: int, workdir: Path, *, seed: int = 0, workers: int = 1,
                     max_time: float | None = None, timeout: float = 1800.0) -> dict:
    """Run the schemathesis CLI against url/openapi.json; (the per-response records, its exit code,
    the failures it printed, seconds)."""
    record = workdir / "responses.jsonl"
    record.unlink(missing_ok=True)
    exe = shutil.which("schemathesis") or shutil.which("st")
    cmd = [exe] if exe else [sys.executable, "-m", "schemathesis.cli"]
    cmd += ["run", url + "/openapi.json", "--checks", CHECKS, "--mode", "all",
            "--phases", "examples,coverage,fuzzing", "--max-examples", str(max_examples),
            "--seed", str(seed), "--workers", str(workers), "--request-timeout", "120",
            "--suppress-health-check", "all", "--no-color", "--continue-on-failure",
            "--report", "junit", "--report-dir", str(workdir / "report")]
    if max_time:
        cmd += ["--max-time", str(int(max_time))]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_server", RECORD_ENV: str(record),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(ROOT)]), "NO_COLOR": "1"}
    t0 = time.time()
    r = subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    seconds = time.time() - t0
    rows = [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
    return {"rows": rows, "returncode": r.returncode, "output": r.stdout, "seconds": seconds,
            "failures": _failures(r.stdout)}


def _failures(output: str) -> list[str]:
    """The failure headlines schemathesis printed (its FAILURES section: one line per failing check)."""
    out, on = [], False
    for line in output.splitlines():
        if "FAILURES" in line:
            on = True
        elif on and ("SUMMARY" in line):
            break
        elif on and line.strip().startswith(("-", "_")) and " " in line.strip():
            out.append(line.strip().strip("-_ ").strip())
        elif on and line.strip() and line.lstrip()[0:2] in ("1.", "2.", "3.", "4.", "5.", "6.", "7.", "8.", "9."):
            out.append(line.strip())
    return out


def summarize(rows: list[dict]) -> dict:
    """Per operation: cases, status-code counts, positive/negative split; totals."""
    ops: dict[str, dict] = {}
    for row in rows:
        op = ops.setdefault(row["op"], {"cases": 0, "status": collections.Counter(), "modes": collections.Counter(),
                                        "error_params": collections.Counter(), "slowest_s": 0.0})
        op["cases"] += 1
        op["status"][str(row["status"])] += 1
        op["modes"][row["mode"]] += 1
        if row["status"] >= 400:
            op["error_params"][str(row.get("param"))] += 1
        op["slowest_s"] = max(op["slowest_s"], row["s"])
    for op in ops.values():
        op["status"] = dict(sorted(op["status"].items()))
        op["modes"] = dict(sorted(op["modes"].items()))
        op["error_params"] = dict(op["error_params"].most_common(12))  # the field each 4xx named (top 12)
    statuses = collections.Counter(str(r["status"]) for r in rows)
    return {"operations": dict(sorted(ops.items())), "cases": len(rows),
            "status_counts": dict(sorted(statuses.items())),
            "server_errors_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
            "other_statuses": sum(v for k, v in statuses.items() if k[0] not in "24"),
            "non_openai_error_bodies": sum(1 for r in rows if r.get("bad_error"))}


def fuzz(model: str = "tiny", max_examples: int = 1000, *, seed: int = 0, workers: int = 1,
         max_time: float | None = None, workdir: Path | None = None) -> dict:
    """The whole harness: server up, schemathesis, the after-checks, server down. Returns the summary."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="fuzz_server_") as d:
            return fuzz(model, max_examples, seed=seed, workers=workers, max_time=max_time, workdir=Path(d))
    tmp = Path(workdir)
    tmp.mkdir(parents=True, exist_ok=True)
    if model == "tiny":
        path, label = str(tiny_model(tmp / "tiny.gguf")), ("random tiny Gemma 3 (tests/distill_helpers."
                                                            "tiny_teacher_gguf: 8 layers, width 64, 512-piece vocabulary)")
    elif model == "270m":
        path, label = None, "the embedded Gemma 3 270M (Q4_K_M GGUF)"
    else:
        path, label = model, model
    t0 = time.time()
    server = Server(path, *SERVER_FLAGS)
    try:
        st = run_schemathesis(server.url, max_examples, tmp, seed=seed, workers=workers, max_time=max_time)
        after = alive_after(server)
        tracebacks = server.tracebacks()
    finally:
        server.stop()
    summary = summarize(st["rows"])
    findings = list(st["failures"])
    if not after["ok"]:
        findings.append(f"after the fuzz: {after}")
    if tracebacks:
        findings.append(f"the server logged {len(tracebacks)} exception(s)")
    return {
        "target": "gemmalab serve (OpenAI-compatible API) from its OpenAPI schema",
        "model": label, "server_flags": " ".join(SERVER_FLAGS),
        "max_examples_per_operation": max_examples, "max_time_s": max_time, "seed": seed, "workers": workers,
        "generation": "positive and negative (schemathesis --mode all; phases examples, coverage, fuzzing)",
        "checks": CHECKS.split(","),
        **summary,
        "schemathesis_exit_code": st["returncode"], "failures": findings,
        "server_alive_after": after, "server_log_tracebacks": len(tracebacks),
        "seconds": round(time.time() - t0, 1), "schemathesis_seconds": round(st["seconds"], 1),
        "cpu": f"{cpu_model()} ({cpu_family()})", "schemathesis": schemathesis_version(),
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
        "_output_tail": st["output"][-4000:],
    }


def docs_section(s: dict) -> str:
    lines = [BEGIN, "", "### Server API fuzzing", "",
             f"`python bench/fuzz_server.py` ({s['date']}): schemathesis {s['schemathesis']} against a real "
             f"`gemmalab serve {s['server_flags']}` on loopback serving the {s['model']}; positive and "
             f"negative (schema-violating) bodies, up to {s['max_examples_per_operation']} generated cases per "
             f"operation plus schemathesis's coverage-phase cases"
             + (f" within {s['max_time_s']:.0f} s" if s.get("max_time_s") else "") + f", seed {s['seed']}. Checks: "
             + ", ".join(f"`{c}`" for c in s["checks"] if c not in ("recorder", "openai_error_body"))
             + ", and ours, `openai_error_body`: every 4xx/5xx body is "
             "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}` with a one-line message.", "",
             "| operation | cases | positive / negative | status codes | slowest (s) |",
             "|---|---:|---|---|---:|"]
    for name, op in s["operations"].items():
        modes = " / ".join(str(op["modes"].get(m, 0)) for m in ("positive", "negative"))
        codes = ", ".join(f"{k}: {v}" for k, v in op["status"].items())
        lines.append(f"| `{name}` | {op['cases']:,} | {modes} | {codes} | {op['slowest_s']:.2f} |")
    after = s["server_alive_after"]
    lines += ["", f"**{s['cases']:,} requests, {s['server_errors_5xx']} 5xx, {s['non_openai_error_bodies']} "
              f"non-OpenAI error bodies, {len(s['failures'])} check failures** "
              f"in {s['seconds']:.0f} s on {s['cpu']}. After the run the server process was "
              f"{'running' if after['process_running'] else 'GONE'}, a normal chat request got "
              f"{after['chat_status']}, and {after['health'].get('free_rows')} of 16 cache rows were free "
              f"({'none leaked' if after['no_leaked_rows'] else 'LEAKED ROWS'}); the server logged "
              f"{s['server_log_tracebacks']} exceptions. Figures: docs/reliability/server_fuzz.json. "
              "Findings, each fixed and kept as a regression test with its request in "
              "tests/test_fuzz_server.py: see that file's docstring.", "", END]
    return "\n".join(lines)


def _write_docs(s: dict) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from docs_section import replace_section
    replace_section(MD, BEGIN, END, docs_section(s), "Reliability")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--max-examples", type=int, default=1000, help="generated cases per operation")
    ap.add_argument("--model", default="tiny", help="tiny (default), 270m, or a GGUF path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--max-time", type=float, default=780.0,
                    help="seconds for schemathesis at most (default 780: the run stays under 15 minutes "
                         "however loaded the machine; 0 for no limit)")
    ap.add_argument("--out", type=Path, default=DOCS_JSON)
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite the docs section")
    ap.add_argument("--report", action="store_true", help="only rebuild the docs section from --out")
    a = ap.parse_args()
    if a.report:
        _write_docs(json.loads(a.out.read_text()))
        return
    s = fuzz(a.model, a.max_examples, seed=a.seed, workers=a.workers, max_time=a.max_time)
    tail = s.pop("_output_tail")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(s, indent=1) + "\n")
    if not a.no_docs:
        _write_docs(s)
    print(f"{s['cases']} requests, status {s['status_counts']}, {s['server_errors_5xx']} 5xx, "
          f"{len(s['failures'])} failures, alive after: {s['server_alive_after']['ok']}, {s['seconds']:.0f} s")
    if s["failures"] or s["server_errors_5xx"] or s["non_openai_error_bodies"] or not s["server_alive_after"]["ok"]:
        print(tail)
        sys.exit(1)


if __name__ == "__main__":
    main()
