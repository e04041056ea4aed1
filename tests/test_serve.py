"""`gemmalab serve`: the real server on loopback with the real 270M, driven by the official openai
client and by raw HTTP for the error cases."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import openai  # noqa: E402  (the [test] extra)

MODEL = "gemma-3-270m-q4_k_m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.devnull, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "gemmalab", "serve", "--port", str(self.port),
                                      *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self.lines[-30:]))
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError("server did not start:\n" + "".join(self.lines[-30:]))

    def _drain(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch", "16", "--max-context", "1024", "--max-body", "100000")
    yield s
    t0 = time.time()
    s.stop()  # SIGTERM: uvicorn drains, the engine stops, then the signal ends the process
    assert time.time() - t0 < 30 and s.proc.returncode in (0, -15)
    assert any("Finished server process" in line for line in s.lines), "".join(s.lines[-20:])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def native():
    import gemmalab
    return gemmalab.load()  # what `gemmalab generate` runs (the default mode)


CHAT = [{"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What color is the sky on a clear day?"}]


@pytest.mark.slow
def test_openai_client_chat_and_completions_match_generate(client, native):
    want = native.chat(CHAT, max_new_tokens=12, temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == ("stop" if want.finish_reason == "stop" else "length")
    prompt_tokens = len(native.tokenizer.encode_chat(CHAT))
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == prompt_tokens + len(want.token_ids)

    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids) and not chunks[-1].choices

    prompt = "The three primary colors are"
    want = native.generate(prompt, max_new_tokens=10, temperature=0)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert streamed == want.text
    # stop strings are cut from the text and end the choice
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                  stop=[want.text.split()[1]])
    assert r.choices[0].finish_reason == "stop" and want.text.split()[1] not in r.choices[0].text


@pytest.mark.slow
def test_sampling_params_n_seed_logprobs(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    a = client.completions.create(n=3, **kw)
    b = client.completions.create(n=3, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1  # n choices sample independently
    assert a.usage.completion_tokens == sum(8 for _ in a.choices)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    first = content[0]
    assert len(first.top_logprobs) == 3 and first.logprob <= 0
    assert first.top_logprobs[0].logprob == pytest.approx(first.logprob)  # greedy took the top token
    r = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.top_logprobs[0]) == 2 and "".join(lp.tokens) == r.choices[0].text


@pytest.mark.slow
def test_sixteen_concurrent_streams_equal_their_sequential_runs(server, client, native):
    prompts = [f"Write the number {i} in words and then" for i in range(16)]
    expected = [native.generate(p, max_new_tokens=16, temperature=0).text for p in prompts]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i):
        try:
            s = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=16, temperature=0,
                                          stream=True)
            results[i] = "".join(c.choices[0].text for c in s)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert [results[i] for i in range(16)] == expected
    h = server.health()
    assert h["running"] == 0 and h["free_rows"] == 16


@pytest.mark.slow
def test_disconnecting_clients_free_their_slots(server, client):
    body = {"model": MODEL, "prompt": "Count from one to one thousand:", "max_tokens": 900,
            "temperature": 0, "stream": True}
    for _ in range(6):  # a loop of clients that hang up after a few chunks
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for n, _line in enumerate(r.iter_lines()):
                if n >= 4:
                    break
    deadline = time.time() + 30
    while time.time() < deadline and server.health()["running"]:
        time.sleep(0.2)
    h = server.health()
    assert h["running"] == 0 and h["free_rows"] == 16 and h["waiting"] == 0, h
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3  # the next request is served


def post(server, path, payload=None, raw=None, headers=None):
    kw = {"content": raw} if raw is not None else {"json": payload}
    return httpx.post(server.url + path, headers=headers or {}, timeout=60, **kw)


def openai_error(resp, status, code=None, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    openai_error(post(server, "/v1/chat/completions", raw=b'{"model": "x", "messages": ['), 400, "invalid_json")
    openai_error(post(server, "/v1/chat/completions", {**chat, "max_tokens": "many"}), 400, param="max_tokens")
    openai_error(post(server, "/v1/chat/completions", {**chat, "temperature": [1]}), 400, param="temperature")
    openai_error(post(server, "/v1/chat/completions", {**chat, "model": "gpt-9"}), 404, "model_not_found", "model")
    openai_error(post(server, "/v1/chat/completions", {**chat, "max_tokens": -5}), 400, param="max_tokens")
    openai_error(post(server, "/v1/chat/completions", {**chat, "max_tokens": 10**9}), 400,
                 "context_length_exceeded", "max_tokens")
    openai_error(post(server, "/v1/chat/completions", {**chat, "messages": []}), 400, param="messages")
    openai_error(post(server, "/v1/chat/completions", {**chat, "messages": [{"role": "robot", "content": "x"}]}),
                 400, param="messages.0.role")
    openai_error(post(server, "/v1/chat/completions", {**chat, "messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}), 400, param="messages")
    long = {"model": MODEL, "prompt": "word " * 1500, "max_tokens": 2}
    openai_error(post(server, "/v1/completions", long), 400, "context_length_exceeded", "prompt")
    openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x" * 200_000}), 413,
                 "request_too_large")
    openai_error(post(server, "/v1/completions", {"model": MODEL}), 400, param="prompt")
    openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": [10**9]}), 400, param="prompt")
    assert httpx.get(server.url + "/v1/nothing", timeout=10).status_code == 404
    ok = post(server, "/v1/chat/completions", chat)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert server.proc.poll() is None
    logged = [json.loads(line.split(" gemmalab.serve ", 1)[1]) for line in server.lines
              if " gemmalab.serve " in line]
    assert any(r.get("status") == 413 for r in logged)  # structured request logs
    assert any(r.get("event") == "completion" and r["completion_tokens"] == 2 for r in logged)


@pytest.mark.slow
def test_api_key_and_small_batch_queue():
    s = Server("--api-key", "sekret", "--max-batch", "2", "--max-context", "256")
    try:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        openai_error(post(s, "/v1/completions", body), 401, "missing_api_key")
        openai_error(post(s, "/v1/completions", body, headers={"Authorization": "Bearer nope"}), 401,
                     "invalid_api_key")
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200  # health needs no key
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0, timeout=300)
        out: list = []
        threads = [threading.Thread(target=lambda i=i: out.append(c.completions.create(
            model=MODEL, prompt=f"Item {i}:", max_tokens=6, temperature=0))) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert len(out) == 5 and all(r.usage.completion_tokens == 6 for r in out)  # 2 rows, 3 queued
    finally:
        s.stop()
