"""Server throughput: `gemmalab serve` vs llama-cpp-python's OpenAI server, same GGUF, same run.

    bash bench/setup_llama_cpp.sh     # once (also installs the llama.cpp server's extras)
    python bench/bench_serve.py       # writes docs/serve.md

For 1, 4 and 16 concurrent clients, each client streams one completion after another (greedy,
`max_tokens` new tokens, end-of-sequence ignored by asking for `min_tokens`-free prompts that run
long) for a fixed number of requests; we report the aggregate generated tokens/s and the p50/p95 time
to first token. Both servers get 2 CPU threads and run one after the other on the same machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time, a dragon who wanted to learn to paint left his mountain and",
           "A steam engine works in the following way. First, water is heated in a boiler until",
           "The history of the printing press begins in the fifteenth century, when",
           "Here is a list of animals, one per line:\n1. Lion\n2."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, env=None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("server did not start")


def one_request(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int, float]:
    """(time to first token, generated tokens, total seconds) of one streamed completion.

    /v1/completions with a plain-text prompt: the model is a base model (llama-cpp-python's chat
    formatting makes it answer with an empty turn)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage, pieces = None, None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for ch in chunk.get("choices") or []:
                if ch.get("text"):
                    pieces += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    # llama-cpp-python's server ignores stream_options.include_usage; it streams one chunk per token
    return (ttft if ttft is not None else total), (usage if usage is not None else pieces), total


def load_test(url: str, model: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    ttfts, counts = [], []
    lock = threading.Lock()

    def client(i):
        for j in range(requests_per_client):
            ttft, n, _ = one_request(url, model, PROMPTS[(i + j) % len(PROMPTS)] + f" (#{i}.{j})", max_tokens)
            with lock:
                ttfts.append(ttft)
                counts.append(n)

    one_request(url, model, "Hello", 4)  # warm-up
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts.sort()
    return {"clients": clients, "requests": len(counts), "tokens": sum(counts), "seconds": wall,
            "tok_s": sum(counts) / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    args = p.parse_args()
    from gemmalab._paths import default_model_path
    model_path = default_model_path()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    results = {}
    servers = {
        "gemmalab": lambda port: [sys.executable, "-m", "gemmalab", "serve", "--port", str(port),
                                  "--threads", str(args.threads), "--max-batch", "16",
                                  "--max-context", "1024", "--model-name", "bench"],
        "llama.cpp": lambda port: [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path),
                                   "--model_alias", "bench", "--n_threads", str(args.threads),
                                   "--n_threads_batch", str(args.threads), "--n_ctx", "4096",
                                   "--port", str(port), "--host", "127.0.0.1",
                                   # its default cancels the running stream when a new request arrives
                                   "--interrupt_requests", "False"],
    }
    for name, cmd in servers.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        print(f"starting {name} ...", file=sys.stderr)
        try:
            proc = start(cmd(port), url, env)
        except Exception as e:  # e.g. llama-cpp-python's server extras missing
            results[name] = {"error": str(e)}
            continue
        try:
            results[name] = [load_test(url, "bench", c, args.requests, args.max_tokens) for c in args.clients]
            for r in results[name]:
                print(f"  {name} {r['clients']:2d} clients: {r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']:.2f} s "
                      f"p95 {r['ttft_p95']:.2f} s", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(60)
    lines = ["# Server throughput: gemmalab serve vs llama-cpp-python's OpenAI server", "",
             f"`python bench/bench_serve.py` on {platform.processor() or platform.machine()} "
             f"({os.cpu_count()} cores), {date.today()}, {args.threads} threads per server, the embedded "
             f"Gemma 3 270M Q4_K_M GGUF. Each client streams {args.requests} completions (`/v1/completions`, plain-text prompts) one after "
             f"another (greedy, up to {args.max_tokens} new tokens); aggregate = all generated tokens / wall "
             "time. gemmalab: --max-batch 16 (continuous batching); llama-cpp-python "
             f"{_llama_version()}: one sequence at a time (its server has no batching), "
             "`--interrupt_requests False` (its default cuts a running stream when another request "
             "arrives); it ignores `include_usage`, so its tokens are counted as streamed chunks (one "
             "per token).", "",
             "| server | clients | requests | generated tokens | aggregate tok/s | TTFT p50 (s) | TTFT p95 (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        if isinstance(rows, dict):
            lines.append(f"| {name} | error: {rows['error']} | | | | | |")
            continue
        for r in rows:
            lines.append(f"| {name} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | "
                         f"{r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} |")
    if all(isinstance(results.get(k), list) for k in servers):
        lines += ["", "| clients | gemmalab / llama.cpp aggregate tok/s |", "|---|---|"]
        for a, b in zip(results["gemmalab"], results["llama.cpp"]):
            lines.append(f"| {a['clients']} | **{a['tok_s'] / b['tok_s']:.2f}x** |")
    text = "\n".join(lines) + "\n"
    (ROOT / "docs" / "serve.md").write_text(text)
    print(text)


def _llama_version() -> str:
    try:
        import llama_cpp
        return llama_cpp.__version__
    except ImportError:
        return "(not installed)"


if __name__ == "__main__":
    main()
