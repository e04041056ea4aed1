"""API fuzzing of `gemmalab serve` from its OpenAPI schema (bench/fuzz_server.py, schemathesis), CI-sized,
and one regression test per finding, each with the request that reproduced it.

Findings (all were 500s or worse before the fix):
- top_p=5e-324 (schemathesis): it rounds to 0 in float32, top-p filtered out every token and sampling
  raised on a NaN distribution. Now a top_p below 1e-7 samples as 1e-7 (the same distribution).
- temperature=1e-45: logits / temperature overflowed to inf, same crash. Now below 1e-5 is greedy.
- And either one, in the engine, failed the whole decode step: every other request decoding in the
  batch ended with a 500 too. Now a sampling error ends only its own sequence.
- seed=2**64: torch's generator cannot take it (OverflowError in the engine thread). Now seed is a
  64-bit integer (400 otherwise), like OpenAI's.
- A body of 100,000 '[': json.loads raised RecursionError. Now 400 invalid_json.
- A completion prompt with a lone surrogate ("\\ud800", valid JSON): the tokenizer's error escaped.
  Now 400 param prompt (chat messages were already caught).
- Two requests with n>1 admitted together (n=9 then n=8, 16 rows): each took one row at admission and
  the rest after its prefill, so the second found too few, failed with a 500 and leaked the rows it
  had taken; the server then had fewer rows for good. Now all n rows are reserved at admission.
- n above --max-batch was a 400 naming `prompt` with code context_length_exceeded: now param `n`.
- A 405 lost its Allow header (the error handler dropped the exception's headers).
- /openapi.json was off and the handlers read raw bodies, so no schema had request bodies; now the
  document declares every body and response (schemathesis fuzzes from it).
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import fuzz_server  # noqa: E402

pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return fuzz_server.tiny_model(tmp_path_factory.mktemp("fuzz_server") / "tiny.gguf")


@pytest.fixture(scope="module")
def server(tiny_gguf):
    s = fuzz_server.Server(str(tiny_gguf), *fuzz_server.SERVER_FLAGS)
    yield s
    s.stop()
    assert not s.tracebacks(), "".join(s.lines[-40:])  # no request made the server log an exception


@pytest.fixture(scope="module")
def tiny_lm(tiny_gguf):
    import gemmalab
    return gemmalab.load(tiny_gguf)


def post(server, path: str, payload=None, raw: bytes | None = None) -> httpx.Response:
    kw = {"content": raw, "headers": {"Content-Type": "application/json"}} if raw is not None else {"json": payload}
    return httpx.post(server.url + path, timeout=60, **kw)


def openai_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert fuzz_server.openai_error_problem(r.status_code, r.content, r.headers["content-type"]) is None, r.text
    err = r.json()["error"]
    assert param is None or err["param"] == param, err
    assert code is None or err["code"] == code, err
    return err


def completion(server, **fields) -> dict:
    return {"model": server.model_name, "prompt": "the cat", "max_tokens": 4, **fields}


# ---- the CI-sized fuzz run --------------------------------------------------------------------------

@pytest.mark.slow
def test_schemathesis_fuzz_no_5xx_openai_errors_server_alive(tmp_path):
    s = fuzz_server.fuzz("tiny", max_examples=40, seed=0, workdir=tmp_path)
    tail = s["_output_tail"]
    assert s["cases"] >= 300, (s["cases"], tail)
    assert set(s["operations"]) == {"GET /health", "GET /v1/models", "POST /v1/chat/completions",
                                    "POST /v1/completions"}
    for op in ("POST /v1/chat/completions", "POST /v1/completions"):  # both data kinds, and real answers
        assert s["operations"][op]["modes"].get("negative") and s["operations"][op]["status"].get("200"), s
    assert s["server_errors_5xx"] == 0 and s["other_statuses"] == 0, (s["status_counts"], tail)
    assert s["non_openai_error_bodies"] == 0, [r for r in s["operations"].values()]
    assert s["failures"] == [] and s["schemathesis_exit_code"] == 0, (s["failures"], tail)
    assert s["server_alive_after"]["ok"] and s["server_log_tracebacks"] == 0, s["server_alive_after"]


def test_openapi_declares_every_request_body_and_error(server):
    doc = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert set(doc["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    schemas = doc["components"]["schemas"]
    for path, name in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(name)
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
        assert schemas[name]["properties"]["model"]["enum"] == [server.model_name]
    assert {"messages", "model"} <= set(schemas["ChatCompletionRequest"]["required"])


def test_validation_errors_are_openai_shaped_400s(server):
    openai_error(post(server, "/v1/completions", completion(server, top_k=-1)), 400, "top_k")
    openai_error(post(server, "/v1/completions", completion(server, prompt={"a": 1})), 400, "prompt")
    openai_error(post(server, "/v1/completions", raw=b"[1, 2]"), 400, code="invalid_json")
    openai_error(post(server, "/v1/chat/completions", {"model": server.model_name}), 400, "messages")


# ---- one regression test per finding ---------------------------------------------------------------

def test_finding_tiny_top_p_samples_instead_of_500(server):
    # schemathesis: POST /v1/completions {"model": "tiny", "prompt": ["O"], "top_p": 5e-324} -> 500
    r = post(server, "/v1/completions", {"model": server.model_name, "prompt": ["O"], "top_p": 5e-324})
    assert r.status_code == 200, r.text
    greedy = post(server, "/v1/completions", completion(server, temperature=0)).json()["choices"][0]["text"]
    tiny = post(server, "/v1/completions", completion(server, top_p=5e-324, seed=3)).json()["choices"][0]["text"]
    assert tiny == greedy  # top_p that small keeps only the most likely token


def test_finding_tiny_temperature_is_greedy_instead_of_500(server):
    r = post(server, "/v1/completions", completion(server, temperature=1e-45))
    assert r.status_code == 200, r.text
    greedy = post(server, "/v1/completions", completion(server, temperature=0))
    assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_finding_seed_beyond_64_bits_is_400(server):
    openai_error(post(server, "/v1/completions", completion(server, seed=2**64)), 400, "seed")
    openai_error(post(server, "/v1/completions", completion(server, seed=-(2**63) - 1)), 400, "seed")
    r = post(server, "/v1/completions", completion(server, seed=2**63 - 1, n=16))  # seed + choice index: fine
    assert r.status_code == 200 and len(r.json()["choices"]) == 16, r.text


def test_finding_deeply_nested_json_is_400(server):
    openai_error(post(server, "/v1/completions", raw=b"[" * 100_000), 400, code="invalid_json")
    openai_error(post(server, "/v1/chat/completions", raw=b'{"a":' * 50_000), 400, code="invalid_json")


def test_finding_lone_surrogate_prompt_is_400(server):
    raw = b'{"model": "%s", "prompt": "a\\ud800b", "max_tokens": 2}' % server.model_name.encode()
    openai_error(post(server, "/v1/completions", raw=raw), 400, "prompt")
    raw = b'{"model": "%s", "messages": [{"role": "user", "content": "\\udfff"}]}' % server.model_name.encode()
    openai_error(post(server, "/v1/chat/completions", raw=raw), 400, "messages")


def test_finding_405_keeps_allow_header(server):
    r = httpx.get(server.url + "/v1/completions", timeout=10)
    openai_error(r, 405)
    assert r.headers["allow"] == "POST"


def test_finding_n_over_batch_names_n(tiny_lm):
    from starlette.testclient import TestClient

    from gemmalab.serve import build
    app, engine = build(tiny_lm, max_batch=2, max_context=128)
    try:
        r = TestClient(app).post("/v1/completions", json={"model": "tiny", "prompt": "hi", "n": 3, "max_tokens": 2})
        openai_error(r, 400, "n")
        assert TestClient(app).get("/openapi.json").json()["components"]["schemas"]["CompletionRequest"][
            "properties"]["n"]["maximum"] == 2
    finally:
        engine.close()


def _collect(engine, ids, params, n=1, max_tokens=40):
    from gemmalab.serve.engine import Request
    done = threading.Event()
    events = []

    def on_event(e):
        events.append(e)
        if sum(x.finish_reason is not None for x in events) == n:
            done.set()
    req = Request(prompt_ids=ids, params=params, max_tokens=max_tokens, on_event=on_event, n=n)
    return req, events, done


def test_finding_rows_reserved_at_admission_none_leak(tiny_lm):
    """n=9 and n=8 admitted together into 16 rows: the second waits for rows instead of failing."""
    from gemmalab.generate import SamplingParams
    from gemmalab.serve.engine import Engine
    engine = Engine(tiny_lm, max_batch=16, max_context=128)
    try:
        ids = tiny_lm.tokenizer.encode("the cat", add_bos=True)
        busy = _collect(engine, ids, SamplingParams(temperature=0), max_tokens=60)
        a = _collect(engine, ids, SamplingParams(temperature=1.0, seed=1), n=9, max_tokens=8)
        b = _collect(engine, ids, SamplingParams(temperature=1.0, seed=2), n=8, max_tokens=8)
        engine.submit(busy[0])  # keeps the engine stepping, so a and b reach the queue together
        engine.submit(a[0])
        engine.submit(b[0])
        for _, events, done in (busy, a, b):
            assert done.wait(60)
            assert all(e.finish_reason in (None, "length", "stop") for e in events), \
                [e.error for e in events if e.error]
        assert engine.load["free_rows"] == 16 and not engine.running and not engine.prefilling
    finally:
        engine.close()


def test_finding_a_sampling_error_fails_only_its_sequence(tiny_lm):
    """A sequence whose sampling raises ends alone; the others in the decode batch go on."""
    from gemmalab.generate import SamplingParams
    from gemmalab.serve.engine import Engine
    engine = Engine(tiny_lm, max_batch=4, max_context=128)
    try:
        ids = tiny_lm.tokenizer.encode("the cat", add_bos=True)
        good = _collect(engine, ids, SamplingParams(temperature=0), max_tokens=30)
        bad = _collect(engine, ids, SamplingParams(temperature=1.0, top_p=5e-324), max_tokens=30)  # NaN in float32
        engine.submit(good[0])
        engine.submit(bad[0])
        assert good[2].wait(60) and bad[2].wait(60)
        assert bad[1][-1].finish_reason == "error"
        assert good[1][-1].finish_reason == "length" and sum(len(e.token_ids) for e in good[1]) == 30
        assert engine.load["free_rows"] == 4
    finally:
        engine.close()
