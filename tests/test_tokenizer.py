"""Tokenizer parity against transformers' GemmaTokenizer built from the same GGUF, and the chat template
against the spec's Jinja template rendered by jinja2.

The reference costs ~25 s to build (transformers rebuilds 262k BPE merges from the vocabulary), so it is
built once per module.
"""
from __future__ import annotations

import json
import random
import time
import unicodedata

import pytest

from gemmalab._paths import default_model_path
from gemmalab.tokenizer import ChatTemplateError, StreamDecoder, Tokenizer

from .synthetic import write_vocab_gguf

# --------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def gguf_path():
    return default_model_path()


@pytest.fixture(scope="module")
def tok(gguf_path):
    t = time.perf_counter()
    tokenizer = Tokenizer.from_gguf(gguf_path)
    print(f"\n[gemmalab] Tokenizer.from_gguf: {time.perf_counter() - t:.2f} s")
    return tokenizer


@pytest.fixture(scope="module")
def ref(gguf_path):
    import transformers
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # a local folder: nothing to download
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        t = time.perf_counter()
        reference = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        print(f"\n[transformers] AutoTokenizer.from_pretrained(gguf_file=...): {time.perf_counter() - t:.2f} s")
    return reference


# --------------------------------------------------------------------------------------------------------
# Encoding parity

LONG_PARAGRAPH = (
    "The Gemma 3 models are trained with distillation and achieve superior performance to Gemma 2 for "
    "both pre-trained and instruction finetuned versions. In particular, our novel post-training recipe "
    "significantly improves the math, chat, instruction-following and multilingual abilities, making "
    "Gemma3-4B-IT competitive with Gemma2-27B-IT and Gemma3-27B-IT comparable to Gemini-1.5-Pro across "
    "benchmarks. We release all our models to the community. " * 6
)

CASES = [
    "",
    "hello world",
    "Hello, World! How are you today?",
    " leading space",
    "trailing space ",
    "   both sides   ",
    "def f(x):\n    if x > 0:\n        return x  # positive\n    return -x\n",
    "class A:\n\tdef g(self):\n\t\treturn {'a': [1, 2, 3]}\n",
    "\t\t\tmixed \t tabs\t\n",
    "one\ntwo\n\nthree\n\n\nfour\n\n\n\n\nfive",
    "\r\nwindows\r\nline endings\r\n",
    "0123456789 3.14159265358979 -42 1e-7 12,345,678.90 100000000000000000000",
    "東京は日本の首都です。今日は良い天気ですね。",
    "中文文本测试：你好，世界！",
    "ひらがな カタカナ 漢字 ｶﾀｶﾅ",
    "한국어 텍스트 처리 테스트입니다.",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "Привет, мир! Ελληνικά. עברית. ไทย.",
    "emoji 😀🎉👍🏽 and ZWJ 👨‍👩‍👧‍👦 👩🏽‍💻 and flags 🇯🇵🇺🇸🇪🇺 🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
    "café naïve résumé Ångström",  # composed (NFC)
    unicodedata.normalize("NFD", "café naïve résumé Ångström"),  # decomposed: no NFKC, stays decomposed
    "ﬁ ligature, full-width ＡＢＣ１２３, ① ™ ½",  # NFKC would change these; the reference does not
    "byte fallback: \U0010ffff \U0001fa7b \U00020000 \U000e0001",
    "private use \ue000\uf8ff and controls \x00\x01\x02\x1b\x7f",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos> <pad><unk><mask> [multimodal]",
    "<start_of_image> an image <end_of_image><unused0><unused6241>",
    "<table><tr><td>html-ish</td></tr></table> <b>bold</b>",
    "<start_of_turn <end_of_turn> <unused <0x41> not-quite-specials",
    "x" + " " * 37 + "y" + "\t" * 40 + "z" + "\n" * 35,
    "URL https://example.com/path?q=1&r=%20x#frag email a.b@c.de",
    "Mixed: English, 日本語, 한국어, العربية, हिन्दी, 😀, 123",
    "\u00a0non-breaking\u2003em space\u3000ideographic space\u200bzero width",
    LONG_PARAGRAPH,
]

SPACE_RUNS = [" " * n + "x" for n in range(1, 21)] + ["a" + " " * n + "b" for n in range(1, 21)] + \
    [" " * n for n in range(1, 21)]


def test_special_ids(tok):
    assert tok.vocab_size == len(tok) == 262144
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)
    assert tok.stop_ids == (1, 106)
    assert tok.id_to_piece(107) == "\n" and tok.id_to_piece(108) == "\n\n"
    assert tok.id_to_piece(255999) == "<start_of_image>" and tok.id_to_piece(256000) == "<end_of_image>"
    assert tok.id_to_piece(138) == "\u2581\u2581"  # stored as "  " in the GGUF, respelled like the reference
    assert tok.token_to_id("<end_of_turn>") == 106 and tok.token_to_id("<0x0A>") == 248
    assert tok.token_to_id("definitely not a piece") is None
    assert tok.is_special(106) and not tok.is_special(255999) and not tok.is_special(107)
    with pytest.raises(ValueError, match="out of range"):
        tok.id_to_piece(262144)


@pytest.mark.slow  # builds the transformers reference (~20 s, once per module)
def test_vocabulary_matches_reference(tok, ref):
    assert len(ref) == tok.vocab_size
    ref_pieces = ref.convert_ids_to_tokens(list(range(tok.vocab_size)))
    assert [tok.id_to_piece(i) for i in range(tok.vocab_size)] == ref_pieces
    assert (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def _check_parity(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref(text).input_ids  # the reference's post-processor prepends <bos>
    assert tok.encode(text, add_bos=False) == ids[1:] == ref(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == ref.decode(ids)
    assert tok.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids[1:]) == text  # round trip (no text here contains a literal "▁")
    return ids


@pytest.mark.slow  # builds the transformers reference (~20 s, once per module)
@pytest.mark.parametrize("text", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_encode_matches_reference(tok, ref, text):
    _check_parity(tok, ref, text)


@pytest.mark.slow  # builds the transformers reference (~20 s, once per module)
def test_space_runs_match_reference(tok, ref):
    for text in SPACE_RUNS:
        _check_parity(tok, ref, text)


def test_some_known_ids(tok):
    assert tok.encode("<start_of_turn>user\nhi<end_of_turn>") == [2, 105, 2364, 107, 2202, 106]
    assert tok.encode("12345", add_bos=False) == [236770, 236778, 236800, 236812, 236810]  # split digits
    assert tok.encode("\U0010ffff", add_bos=False) == [238 + 0xF4, 238 + 0x8F, 238 + 0xBF, 238 + 0xBF]
    assert tok.encode("", add_bos=True) == [2] and tok.encode("", add_bos=False) == []


@pytest.mark.slow  # builds the transformers reference (~20 s, once per module)
def test_fuzz_matches_reference(tok, ref):
    rng = random.Random(1234)
    alphabet = [chr(c) for c in list(range(0x20, 0x7F)) * 3 + list(range(0xA0, 0x250))
                + list(range(0x3040, 0x30FF)) + list(range(0x4E00, 0x4E40)) + list(range(0xAC00, 0xAC20))
                + [0x1F600, 0x1F9FF, 0x1FA7B, 0x200D, 0xFE0F, 0x0301, 0xE000, 0, 1, 9, 10, 13, 0x3000, 0xA0]]
    pieces = [tok.id_to_piece(i).replace("\u2581", " ") for i in rng.sample(range(494, 255968), 3000)]
    pieces += ["<start_of_turn>", "<eos>", "<unused7>", "<start_of_image>", "\n\n", "\t\t", "<table>",
               "<start_of_", "<bos", " ", "  ", "\n"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 25))) for _ in range(300)]
    for text in texts:
        assert tok.encode(text) == ref(text).input_ids, repr(text)
        assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_encode_rejects_non_str(tok):
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


# --------------------------------------------------------------------------------------------------------
# Decoding

B = 238  # id of <0x00>; <0xNN> is B + 0xNN


@pytest.mark.slow  # builds the transformers reference (~20 s, once per module)
def test_decode_specials_and_skip(tok, ref):
    ids = [2, 105, 2364, 107, 5, 255999, 168, 106, 1, 3, 0, 4, 11, B + 0xE2, 1, B + 0x82, B + 0xAC]
    assert tok.decode(ids) == ref.decode(ids)
    assert tok.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special=True) == "user\n[multimodal]<start_of_image><table>€"
    assert tok.decode([138, 236743, 29104]) == "    hello"  # "▁▁", "▁", "▁hello": no space dropped or added


def test_decode_accepts_tensors_and_rejects_bad_ids(tok):
    import torch
    assert tok.decode(torch.tensor([2, 23391, 1902])) == "<bos>hello world"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([5, -1])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


@pytest.mark.slow  # builds the transformers reference (~20 s, once per module)
def test_decode_invalid_bytes(tok, ref):
    # A run of byte tokens that is all bad: one U+FFFD per byte, like the reference.
    for ids in ([B + 0xE2, B + 0x82], [B + 0xE2], [B + 0x82, B + 0x82, 1], [B + 0xFF, 23391]):
        assert tok.decode(ids) == ref.decode(ids), ids
    # Valid characters next to bad bytes are kept; the reference turns the whole run into U+FFFDs
    # (documented difference: no streaming decoder could match it).
    assert tok.decode([B + 0xE2, B + 0x82, B + 0xAC, B + 0xE2]) == "€\ufffd"
    assert ref.decode([B + 0xE2, B + 0x82, B + 0xAC, B + 0xE2]) == "\ufffd" * 4


# --------------------------------------------------------------------------------------------------------
# Streaming

STREAM_TEXTS = [
    "emoji 😀🎉👍🏽 ZWJ 👨‍👩‍👧‍👦 flags 🇯🇵🇺🇸 🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
    "東京は日本の首都です。한국어 텍스트. 中文文本测试",
    "byte fallback \U0010ffff\U0001fa7b\U00020000 x\U0002a6df\U000e0001 end",
    "  leading spaces, a  double space,\n\nnew lines\tand tabs   ",
    "<start_of_turn>model\nSure! ✅ Here: \U0001fa7b<end_of_turn>",
    "a replacement char \ufffd in the original",
    LONG_PARAGRAPH[:300],
]


def _stream(tok, ids, skip_special=False):
    dec = tok.stream_decoder(skip_special=skip_special)
    assert isinstance(dec, StreamDecoder)
    chunks = [dec.push(i) for i in ids]
    chunks.append(dec.flush())
    return chunks


@pytest.mark.parametrize("text", STREAM_TEXTS, ids=[f"stream{i}" for i in range(len(STREAM_TEXTS))])
def test_stream_decoder(tok, text):
    ids = tok.encode(text)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == "<bos>" + text
    if "\ufffd" not in text:
        assert not any("\ufffd" in c for c in chunks)
    # Byte-fallback characters come out whole, on the token that completes them.
    for c in chunks:
        assert all(not 0xD800 <= ord(ch) <= 0xDFFF for ch in c)
    assert "".join(_stream(tok, ids, skip_special=True)) == tok.decode(ids, skip_special=True)


def test_stream_holds_partial_characters(tok):
    ids = tok.encode("\U0010ffff!", add_bos=False)  # 4 byte tokens then "!"
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in ids] == ["", "", "", "\U0010ffff", "!"]
    assert dec.flush() == ""
    dec.push(B + 0xF4)
    assert dec.flush() == "\ufffd"  # an unfinished character at the end, as decode() renders it


def test_stream_fuzz_random_ids(tok):
    rng = random.Random(7)
    pool = list(range(0, 300)) + list(range(B, B + 256)) * 4 + rng.sample(range(494, 262144), 2000)
    for _ in range(1500):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 24))]
        for skip in (False, True):
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special=skip), ids


# --------------------------------------------------------------------------------------------------------
# Chat template: the spec's Jinja template (spec §4.3, verbatim), rendered as transformers renders it.

from gemmalab.tokenizer import CHAT_TEMPLATE as GEMMA3_CHAT_TEMPLATE  # noqa: E402


@pytest.fixture(scope="module")
def jinja_template():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):  # what transformers registers
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # transformers' settings
    env.globals["raise_exception"] = raise_exception
    return env.from_string(GEMMA3_CHAT_TEMPLATE)


CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [  # spec §4.3, [R] Table 4
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "My name is Gemma!"},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {"role": "system", "content": "You are a terse assistant.  "},
        {"role": "user", "content": "  Hello!\n"},
        {"role": "assistant", "content": "\n Hi. \n"},
    ],
    [
        {"role": "system", "content": [{"type": "text", "text": "Describe images."}, {"type": "text", "text": "x"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "  What is this?  "},
                                     {"type": "image", "url": "ignored"}, {"type": "text", "text": "And this?"}]},
    ],
    [
        {"role": "user", "content": [{"type": "text", "text": "东京 😀"}]},
        {"role": "model", "content": "<b>ok</b>"},
        {"role": "user", "content": "line1\n\nline2\t"},
        {"role": "assistant", "content": ""},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": "no system text"}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chat_template_matches_jinja(tok, jinja_template, conv, add_generation_prompt):
    messages = CONVERSATIONS[conv]
    expected = jinja_template.render(messages=messages, bos_token="<bos>", add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_spec_example(tok):
    assert tok.apply_chat_template(CONVERSATIONS[1]) == (
        "<bos><start_of_turn>user\nWho are you?<end_of_turn>\n"
        "<start_of_turn>model\nMy name is Gemma!<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n")
    assert tok.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nYou are a terse assistant.  \n\nHello!<end_of_turn>\n"
        "<start_of_turn>model\nHi.<end_of_turn>\n")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_encode_chat_has_one_bos(tok, add_generation_prompt):
    for messages in CONVERSATIONS:
        ids = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
        assert tok.decode(ids) == tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert ids[-1] == 107 and 105 in ids and 106 in ids  # ends with "\n" either way


@pytest.mark.slow  # builds the transformers reference (~20 s, once per module)
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_encode_chat(tok, ref, conv):
    messages = CONVERSATIONS[conv]
    ids = tok.encode_chat(messages)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    rendered = tok.apply_chat_template(messages)
    assert ids == ref(rendered, add_special_tokens=False).input_ids
    assert tok.decode(ids) == rendered
    assert ids[-3:] == [105, 4368, 107]  # <start_of_turn> model \n


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "assistant", "content": "a"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
])
def test_chat_roles_must_alternate(tok, jinja_template, messages):
    import jinja2

    with pytest.raises(ChatTemplateError, match="alternate"):
        tok.apply_chat_template(messages)
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):  # the template refuses them too
        jinja_template.render(messages=messages, bos_token="<bos>", add_generation_prompt=True)


@pytest.mark.parametrize("messages, match", [
    ([], "empty"),
    ("hello", "list"),
    ([{"role": "user", "content": None}], "content"),
    ([{"role": "user", "content": 5}], "content"),
    ([{"role": "user", "content": {"type": "text", "text": "x"}}], "content"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "type"),
    ([{"role": "user", "content": [{"type": "text"}]}], "text"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "unknown role"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "only allowed first"),
    ([{"content": "no role"}], "role"),
    (["not a dict"], "dict"),
])
def test_chat_errors(tok, messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        tok.apply_chat_template(messages)
    with pytest.raises(ValueError):  # ChatTemplateError is a ValueError
        tok.encode_chat(messages)


# --------------------------------------------------------------------------------------------------------
# Other sources: tokenizer.json, tokenizer.model, an open GGUFFile


SOURCE_TEXTS = ["hello  world\n\n", "<start_of_turn>user\n東京 😀\U0010ffff<end_of_turn>", "def f():\n\treturn 1"]


@pytest.mark.slow  # builds the transformers reference (~20 s, once per module)
def test_from_hf_dir_tokenizer_json(tok, ref, tmp_path):
    ref.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
    other = Tokenizer.from_hf_dir(tmp_path)
    assert other.vocab_size == tok.vocab_size
    assert (other.bos_id, other.eos_id, other.pad_id, other.stop_ids) == (2, 1, 0, (1, 106))
    for text in SOURCE_TEXTS + CASES[::4]:
        assert other.encode(text) == tok.encode(text)
        assert other.decode(other.encode(text)) == tok.decode(tok.encode(text))


def test_from_hf_dir_tokenizer_model(tok, gguf_path, tmp_path):
    """A SentencePiece file spelled like Gemma's own (whitespace runs as real spaces, original types)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from gemmalab.checkpoints.gguf_file import GGUFFile

    meta = GGUFFile(gguf_path).metadata
    mp = pb.ModelProto()
    mp.trainer_spec.model_type = pb.TrainerSpec.BPE
    mp.trainer_spec.unk_id, mp.trainer_spec.bos_id, mp.trainer_spec.eos_id, mp.trainer_spec.pad_id = 3, 2, 1, 0
    for i, (piece, score, kind) in enumerate(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"],
                                                 meta["tokenizer.ggml.token_type"])):
        mp.pieces.add(piece=piece, score=float(score), type=2 if i == 3 else int(kind))
    (tmp_path / "tokenizer.model").write_bytes(mp.SerializeToString())
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<image_soft_token>": 262144}))
    other = Tokenizer.from_hf_dir(tmp_path / "tokenizer.model")  # a file inside the folder works too
    assert other.vocab_size == tok.vocab_size + 1
    assert other.encode("a<image_soft_token>b", add_bos=False) == [236746, 262144, 236763]
    for text in SOURCE_TEXTS + CASES[::3]:
        assert other.encode(text) == tok.encode(text)
        assert other.decode(other.encode(text)) == tok.decode(tok.encode(text))


def test_from_hf_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model.*tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a proto")
    with pytest.raises(ValueError, match="SentencePiece"):
        Tokenizer.from_hf_dir(tmp_path)


def _tiny_gguf(path):
    """A small SentencePiece vocabulary in a GGUF."""
    import gguf
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "  "]
    types = [3, 3, 3, 3, 3, 3, 4, 4]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    normal = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁w", "▁wor", "or", "▁world", "ld"]
    tokens += normal
    types += [1] * len(normal)
    write_vocab_gguf(path, tokens, [-1000.0] * 264 + [-float(i) for i in range(len(normal))], types)
    return gguf


def test_from_gguf_file_and_path_agree(tmp_path):
    from gemmalab.checkpoints.gguf_file import GGUFFile

    path = tmp_path / "tiny.gguf"
    _tiny_gguf(path)
    a = Tokenizer.from_gguf(path)
    b = Tokenizer.from_gguf(GGUFFile(path))
    assert a.vocab_size == b.vocab_size == 264 + 17
    assert [a.id_to_piece(i) for i in range(a.vocab_size)] == [b.id_to_piece(i) for i in range(b.vocab_size)]
    text = "hello  world\n<start_of_turn>€"
    ids = a.encode(text)
    assert ids == b.encode(text)
    hello, world, spaces = a.token_to_id("hello"), a.token_to_id("▁world"), a.token_to_id("▁▁")
    euro = [8 + 0xE2, 8 + 0x82, 8 + 0xAC]
    assert ids == [2, hello, spaces, a.token_to_id("w"), a.token_to_id("or"), a.token_to_id("ld"), 6, 4] + euro
    assert a.encode("hello world", add_bos=False) == [hello, world]
    assert a.decode(ids) == "<bos>" + text
    assert a.stop_ids == (1, 5)


def test_internals_added_token_regex_and_proto_blob():
    from gemmalab.tokenizer import _added_token_regex, _pieces_blob, _pieces_blob_numpy

    rx = _added_token_regex(["ab", "abcd", "bc", "<x>", "<xy>"])  # leftmost-longest, like the reference
    assert [m.group() for m in rx.finditer("abce abcd xbcd <xy> <x <x>")] == ["ab", "abcd", "bc", "<xy>", "<x>"]
    pieces = ["<unk>", "a", "\u2581\u2581", "東京", "😀", "x" * 118]
    types, scores = bytes([2, 1, 1, 1, 4, 3]), bytes(range(4 * len(pieces)))
    assert _pieces_blob_numpy(pieces, types, scores) == _pieces_blob(pieces, types, scores)
    long = pieces + ["y" * 119]  # a two-byte record-length varint: the loop version handles it
    assert _pieces_blob_numpy(long, types + b"\x01", scores + b"abcd") is None
    from sentencepiece import sentencepiece_model_pb2 as pb

    mp = pb.ModelProto()
    mp.ParseFromString(_pieces_blob(long, types + b"\x01", scores + b"abcd"))
    assert [p.piece for p in mp.pieces] == long and [p.type for p in mp.pieces] == list(types) + [1]


def test_from_gguf_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ValueError, match="not a GGUF"):
        Tokenizer.from_gguf(bad)
