"""Fuzz harnesses of the tokenizer (fuzz/fuzz_tokenizer.py, fuzz_chat.py, fuzz_hf_tokenizer.py), CI-sized,
and the regressions they (and the review that wrote them) found, each with its minimized reproducer.

Documented behaviour these pin down:
- encode takes any valid Unicode text; a lone surrogate raises TokenizerError (one line);
- decode(encode(s, add_bos=False)) == s.replace("\\u2581", " ") for every valid Unicode s, special-token
  text included;
- decode / StreamDecoder.push / id_to_piece raise TokenizerError for an id that is not an int in
  [0, vocab_size);
- render_chat raises ChatTemplateError for messages the template cannot render;
- from_hf_dir raises CheckpointError for files it cannot read (TokenizerNotFoundError, also a
  FileNotFoundError, for a folder with neither tokenizer file).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from gemmalab._paths import default_model_path
from gemmalab.checkpoints.errors import CheckpointError
from gemmalab.tokenizer import (ChatTemplateError, Tokenizer, TokenizerError, TokenizerNotFoundError,
                                render_chat)

from .fuzz_helpers import ROOT, run_fuzz


def _harness(name: str):
    """The harness module, for its seed builders and oracle. gemmalab is already imported here, so the
    coverage instrumentation (which must come first) is replaced by a no-op for this import."""
    import contextlib
    import sys

    sys.path.insert(0, str(ROOT / "fuzz"))
    try:
        import _harness

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_harness, "instrumented", contextlib.nullcontext)
            spec = importlib.util.spec_from_file_location(f"fuzz_{name}_mod", ROOT / "fuzz" / f"fuzz_{name}.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "fuzz"))
    return mod


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("tokenizers")
    return _harness("hf_tokenizer")


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg.strip() and "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------------------------------
# CI-sized fuzz runs


def test_fuzz_tokenizer(tmp_path):
    stats = run_fuzz("tokenizer", tmp_path, runs=2000, seconds=45)
    assert stats["outcomes"].get("ok", 0) > 0


def test_fuzz_chat(tmp_path):
    stats = run_fuzz("chat", tmp_path, runs=2000, seconds=45)
    assert stats["outcomes"].get("ok", 0) > 0 and stats["outcomes"].get("ChatTemplateError", 0) > 0


def test_fuzz_hf_tokenizer(tmp_path):
    stats = run_fuzz("hf_tokenizer", tmp_path, runs=2000, seconds=45)
    assert stats["outcomes"].get("ok", 0) > 0


# --------------------------------------------------------------------------------------------------------
# Text: lone surrogates, the round trip


@pytest.mark.parametrize("text", ["a\ud800b", "\udcff", "ok \udbff\udfff", "x" * 100 + "\ud800",
                                  b"caf\xe9".decode("utf-8", "surrogateescape")])
def test_encode_lone_surrogate_is_tokenizer_error(tok, text):
    # Was RuntimeError("Unable to cast Python instance of type <class 'str'> to C++ type '?' ...")
    # from SentencePiece's binding.
    with pytest.raises(TokenizerError, match="lone surrogate U\\+D[89A-F][0-9A-F]{2} at index") as e:
        tok.encode(text)
    _one_line(e)
    with pytest.raises(TokenizerError):
        tok.encode_chat([{"role": "user", "content": text}])
    assert isinstance(e.value, ValueError)


def test_surrogate_pair_written_as_two_code_points_is_refused_but_joined_is_fine(tok):
    assert tok.decode(tok.encode("\U0001f600", add_bos=False)) == "\U0001f600"
    with pytest.raises(TokenizerError):
        tok.encode("\ud83d\ude00")  # UTF-16 halves in a Python str are two lone surrogates


@pytest.mark.parametrize("text", ["", "<start_of_turn>user\nhi<end_of_turn>", "<bos<start_of_", "\x00\r\n\t",
                                  "\ufffd\ufeff\u200d", "  \n\n\n   x", "<unk><mask>[multimodal]<unused99>",
                                  "東京 😀 \U0010ffff \U000e0001"])
def test_round_trip_on_valid_unicode(tok, text):
    assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_round_trip_visible_space_comes_back_as_space(tok):
    # SentencePiece's "▁" is its spelling of " ": the one character the round trip does not keep
    # (the reference's decoder does the same Replace("▁", " ")).
    assert tok.decode(tok.encode("a\u2581b \u2581\u2581", add_bos=False)) == "a b   "


# --------------------------------------------------------------------------------------------------------
# Ids


@pytest.mark.parametrize("bad", [-1, -(2**63), 262144, 2**64, 2**5000, 1.5, 2.0, "12", None, b"\x01", [1]])
def test_bad_ids_are_tokenizer_errors(tok, bad):
    # Was ValueError / TypeError from int(), or a silent int(2.7) == 2; 2**5000 has no str() (int digits limit).
    for call in (lambda: tok.decode([5, bad]), lambda: tok.stream_decoder().push(bad),
                 lambda: tok.id_to_piece(bad), lambda: tok.is_special(bad)):
        with pytest.raises(TokenizerError) as e:
            call()
        assert len(_one_line(e)) < 200


def test_ids_that_are_not_a_sequence(tok):
    for ids in (None, "12", b"\x01\x02", 3.0):
        with pytest.raises(TokenizerError, match="sequence of ints"):
            tok.decode(ids)
    assert tok.decode(True) == tok.decode([1])  # bools are ints (as before)


def test_stream_prefix_property(tok):
    ids = [2, 23391, 238 + 0xE2, 238 + 0x82, 238 + 0xAC, 238 + 0xF0, 238 + 0x9F, 106]
    dec, out = tok.stream_decoder(), ""
    for k, i in enumerate(ids):
        out += dec.push(i)
        full = tok.decode(ids[:k + 1])
        assert full.startswith(out) and set(full[len(out):]) <= {"\ufffd"} and len(full) - len(out) <= 3
    assert out + dec.flush() == tok.decode(ids)


# --------------------------------------------------------------------------------------------------------
# Chat


@pytest.mark.parametrize("role", [["user"], {"a": 1}, 1, None])
def test_chat_role_that_is_not_a_string(role):
    # ["user"] was TypeError("unhashable type: 'list'") from the role lookup.
    with pytest.raises(ChatTemplateError, match="unknown role") as e:
        render_chat([{"role": "user", "content": "a"}, {"role": role, "content": "b"}])
    _one_line(e)
    with pytest.raises(ChatTemplateError):
        render_chat([{"role": role, "content": "b"}])


def test_chat_fuzz_seeds_replay(tok):
    """Every seed of fuzz_chat through its oracle (jinja2 comparison included), without atheris."""
    pytest.importorskip("jinja2")
    pytest.importorskip("atheris")
    h = _harness("chat")
    h.setup(Path("."))
    outcomes = set()
    for data in h.seeds(Path(".")):
        try:
            h.one(data, Path("."))
            outcomes.add("ok")
        except (ChatTemplateError, TokenizerError) as e:
            assert str(e).strip() and "\n" not in str(e)
            outcomes.add(type(e).__name__)
    assert outcomes == {"ok", "ChatTemplateError", "TokenizerError"}


# --------------------------------------------------------------------------------------------------------
# Tokenizer files (from_hf_dir)


def _folder(tmp_path: Path, files: dict[str, bytes | str]) -> Path:
    d = tmp_path / "model"
    d.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (d / name).write_bytes(body.encode() if isinstance(body, str) else body)
    return d


def test_hf_seeds_load(hf, tmp_path):
    t = Tokenizer.from_hf_dir(_folder(tmp_path, {"tokenizer.json": hf.tokenizer_json()}))
    assert t.decode(t.encode("hello world<end_of_turn>")) == "<bos>hello world<end_of_turn>"
    (tmp_path / "model" / "tokenizer.model").write_bytes(hf.tokenizer_model())
    t = Tokenizer.from_hf_dir(tmp_path / "model")
    assert t.decode(t.encode("hello  world\n\n")) == "<bos>hello  world\n\n"


def test_hf_spm_piece_not_utf8(hf, tmp_path):
    # fuzz finding: a tokenizer.model piece whose bytes are not UTF-8 came back from protobuf as bytes,
    # then TypeError("a bytes-like object is required, not 'str'") in _from_vocab.
    model = hf.tokenizer_model()
    assert model.count(b"<0x41>") == 1
    bad = model.replace(b"<0x41>", b"<0\x88\xba\xb9\xc2")
    with pytest.raises(CheckpointError, match="piece .* is not UTF-8") as e:
        Tokenizer.from_hf_dir(_folder(tmp_path, {"tokenizer.model": bad}))
    _one_line(e)


def test_hf_json_missing_byte_pieces_or_unk(hf, tmp_path):
    # fuzz finding: a tokenizer.json that lost byte-fallback pieces and its unk token loaded, then
    # encode failed with tokenizers' "Unk token `<unk>` not found in the vocabulary".
    j = json.loads(hf.tokenizer_json())
    vocab = j["model"]["vocab"]
    no_bytes = json.loads(json.dumps(j))
    del no_bytes["model"]["vocab"]["<0x41>"]
    with pytest.raises(CheckpointError, match="1 of the 256 byte-fallback pieces"):
        Tokenizer.from_hf_dir(_folder(tmp_path / "a", {"tokenizer.json": json.dumps(no_bytes)}))
    no_unk = json.loads(json.dumps(j))
    no_unk["model"]["unk_token"] = "<nope>"
    with pytest.raises(CheckpointError, match="unk token"):
        Tokenizer.from_hf_dir(_folder(tmp_path / "b", {"tokenizer.json": json.dumps(no_unk)}))
    no_fallback = json.loads(json.dumps(j))
    no_fallback["model"]["byte_fallback"] = False
    with pytest.raises(CheckpointError, match="byte fallback"):
        Tokenizer.from_hf_dir(_folder(tmp_path / "c", {"tokenizer.json": json.dumps(no_fallback)}))
    assert len(vocab) > 256


def test_hf_json_bogus_id_does_not_size_the_table(hf, tmp_path):
    # One id of 10**8 used to allocate a 10**8-entry piece table (10**10: MemoryError).
    j = json.loads(hf.tokenizer_json())
    j["model"]["vocab"]["zzz"] = 10**8
    with pytest.raises(CheckpointError, match="token id 100000000 for a vocabulary"):
        Tokenizer.from_hf_dir(_folder(tmp_path, {"tokenizer.json": json.dumps(j)}))


@pytest.mark.parametrize("files, match", [
    ({"tokenizer_config.json": "[1, 2]"}, "must hold a JSON object"),  # was AttributeError: .get
    ({"tokenizer_config.json": "{"}, "not valid JSON"),
    ({"tokenizer_config.json": b"\xff{}"}, "not valid JSON"),  # was UnicodeDecodeError
    ({"tokenizer_config.json": "[" * 100_000}, "not valid JSON"),  # was RecursionError
    ({"tokenizer_config.json": '{"added_tokens_decoder": [1]}'}, "added_tokens_decoder must be an object"),
    ({"tokenizer_config.json": '{"added_tokens_decoder": {"x": {"content": "a"}}}'}, "is not an integer"),
    ({"tokenizer_config.json": '{"added_tokens_decoder": {"5": {"special": true}}}'}, "string 'content'"),
    ({"tokenizer_config.json": '{"added_tokens_decoder": {"5": "a"}}'}, "string 'content'"),
    ({"tokenizer_config.json": '{"added_tokens_decoder": {"-1": {"content": "a"}}}'}, "negative"),
    ({"added_tokens.json": '{"<x>": "y"}'}, "is not an integer"),  # was ValueError from int()
    ({"added_tokens.json": '{"<x>": 1.5}'}, "is not an integer"),
    ({"added_tokens.json": '{"<x>": 99999}'}, "past the vocabulary end"),
    ({"added_tokens.json": '["<x>"]'}, "must hold a JSON object"),
])
def test_hf_config_files(hf, tmp_path, files, match):
    with pytest.raises(CheckpointError, match=match) as e:
        Tokenizer.from_hf_dir(_folder(tmp_path, {"tokenizer.model": hf.tokenizer_model(), **files}))
    _one_line(e)


def test_hf_empty_folder(tmp_path):
    with pytest.raises(TokenizerNotFoundError) as e:
        Tokenizer.from_hf_dir(tmp_path)
    assert isinstance(e.value, CheckpointError) and isinstance(e.value, FileNotFoundError)


def test_hf_not_a_tokenizer(tmp_path):
    for name, body in (("tokenizer.json", b"{}"), ("tokenizer.json", b"\x00"), ("tokenizer.model", b"\xff" * 9)):
        d = tmp_path / f"{name}{len(body)}"
        d.mkdir()
        (d / name).write_bytes(body)
        with pytest.raises(CheckpointError) as e:
            Tokenizer.from_hf_dir(d)
        _one_line(e)


def test_chat_error_message_for_values_without_repr():
    # An int of 5000 digits has no repr (ValueError: int digits limit): the message must still be made.
    for messages in ([{"role": 10**5000, "content": "x"}], [{"role": "user", "content": [10**5000]}]):
        with pytest.raises(ChatTemplateError) as e:
            render_chat(messages)
        assert "<int>" in _one_line(e)
