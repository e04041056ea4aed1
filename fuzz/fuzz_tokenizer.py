"""Fuzz the real Gemma 3 tokenizer (the embedded 270M GGUF's vocabulary): encode of arbitrary text,
decode and the StreamDecoder on arbitrary ids.

Byte 0 picks the mode (bits 0-2) and flags (bit 3: add_bos, bit 4: skip_special); the rest is the text
or the ids:

- modes 0-4, text, decoded from the bytes as UTF-8 with errors "replace" (valid Unicode),
  "surrogateescape" (bad bytes become lone surrogates U+DC80..U+DCFF), "surrogatepass" (CESU-style
  ED A0 80 is a lone U+D800; falls back to "replace"), UTF-16-LE with "surrogatepass" (any BMP
  code unit, lone surrogates anywhere), or a "token soup" (each byte picks a fragment: special-token
  strings whole and cut, whitespace runs, "\u2581", multi-byte characters, ...).
  Oracle: lone surrogate -> TokenizerError (the documented behaviour); otherwise the ids are ints in
  range, `encode(s)` is `[bos] + encode(s, add_bos=False)`, and the round trip
  `decode(encode(s, add_bos=False)) == s.replace("\u2581", " ")` holds for every valid Unicode string
  (special-token text included: it encodes to the special id and decodes back to its text; only
  SentencePiece's visible space "\u2581" comes back as " ", as in the reference), and streams as decode.
- modes 5-7, ids: little-endian 3-byte words, spread over the specials, the byte-fallback pieces, the
  whole vocabulary, just past its end and negative; mode 7 also mixes in non-integers (a float, a
  numeric string, None). Oracle: an id that is not an int in [0, vocab_size) -> TokenizerError from
  decode and from StreamDecoder.push; otherwise decode returns valid Unicode (no lone surrogate), the
  stream's chunks concatenate to decode(ids), each chunk is whole characters, and after every push
  the text so far plus at most 3 U+FFFD (a held-back, unfinished character) is decode(ids[:k]).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Finding, Target, instrumented, main  # noqa: E402

with instrumented():
    from gemmalab._paths import default_model_path
    from gemmalab.tokenizer import Tokenizer, TokenizerError

TOK: Tokenizer | None = None
B = 238  # <0x00>
FRAGMENTS = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<unused0>",
             "<unused99>", "<start_of_image>", "<end_of_image>", "<image_soft_token>", "[multimodal]", "<table>",
             "<start_of_", "<end_of", "<bo", "s>", "<", ">", "\n", "\n\n", "\n\n\n", "\t", "\t\t", " ", "  ",
             "     ", "\u2581", "\u2581\u2581", "\r\n", "\x00", "\ufffd", "\ufeff", "\u200d", "\u0301", "é", "e\u0301",
             "東京", "😀", "👨\u200d👩\u200d👧", "\U0010ffff", "\U000e0001", "\u3000", "\xa0", "ﬁ", "①", "Ａ",
             "hello", " world", "12345", "def f(x):", "    return", "://", "...", "—", "\\u0000", "&amp;",
             "\ud800", "\udcff", "\udbff\udfff"]


def setup(scratch: Path) -> None:
    global TOK
    TOK = Tokenizer.from_gguf(default_model_path())  # once per process: a few seconds


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def text_of(mode: int, body: bytes) -> str:
    if mode == 0:
        return body.decode("utf-8", "replace")
    if mode == 1:
        return body.decode("utf-8", "surrogateescape")
    if mode == 2:
        try:
            return body.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return body.decode("utf-8", "replace")
    if mode == 3:
        return body[: len(body) & ~1].decode("utf-16-le", "surrogatepass")
    out = []  # token soup: a byte < 128 picks a fragment, others are Latin-1 characters
    for b in body:
        out.append(FRAGMENTS[b % len(FRAGMENTS)] if b < 128 else chr(b))
    return "".join(out)


def stream(tok: Tokenizer, ids: list, skip: bool, prefix_check: bool) -> str:
    """Push every id; check the chunks (whole characters, prefix property); return their concatenation."""
    dec = tok.stream_decoder(skip_special=skip)
    out = []
    for k, i in enumerate(ids):
        c = dec.push(i)
        if _has_surrogate(c):
            raise Finding(f"StreamDecoder.push returned part of a character: {c!r}")
        out.append(c)
        if prefix_check and k < 48:
            so_far, full = "".join(out), tok.decode(ids[:k + 1], skip_special=skip)
            rest = full[len(so_far):]
            if not full.startswith(so_far) or rest.strip("\ufffd") or len(rest) > 3:
                raise Finding(f"after {k + 1} pushes the stream has {so_far!r}, decode has {full!r}")
    c = dec.flush()
    out.append(c)
    if dec.flush() != "":
        raise Finding("a second flush returned text")
    return "".join(out)


def one_text(tok: Tokenizer, text: str, add_bos: bool, skip: bool) -> None:
    if _has_surrogate(text):
        try:
            tok.encode(text, add_bos=add_bos)
        except TokenizerError:
            raise
        raise Finding(f"encode accepted a lone surrogate: {text!r:.200}")
    ids = tok.encode(text, add_bos=False)
    if not all(type(i) is int and 0 <= i < tok.vocab_size for i in ids):
        raise Finding(f"encode returned ids out of range: {ids[:20]}")
    if add_bos and tok.encode(text) != [tok.bos_id] + ids:
        raise Finding("encode(s) is not [bos] + encode(s, add_bos=False)")
    back = tok.decode(ids)
    if back != text.replace("\u2581", " "):
        raise Finding(f"round trip: {text!r:.200} -> {ids[:30]} -> {back!r:.200}")
    if stream(tok, ids, skip, prefix_check=False) != tok.decode(ids, skip_special=skip):
        raise Finding("the stream of encode(s) differs from decode")


def ids_of(mode: int, body: bytes, vocab: int) -> list:
    out: list = []
    for k in range(0, len(body) - 2, 3):
        w = int.from_bytes(body[k:k + 3], "little")
        sel, v = w >> 20, w & 0xFFFFF  # 4 bits choose the region, 20 bits the id in it
        if sel < 5:
            out.append(B + v % 256)  # byte-fallback pieces: the interesting decode paths
        elif sel < 8:
            out.append(v % 512)  # specials, unused, whitespace runs, bytes
        elif sel < 13:
            out.append(v % vocab)
        elif sel == 13:
            out.append(vocab + v % 4 if v & 1 else vocab - 1 - v % 4)
        elif sel == 14:
            out.append(-1 - v % 3 if v & 1 else (1 << (v % 80)) * (-1 if v & 2 else 1))
        elif mode == 7:
            out.append((1.5, "12", None, 2.0, True, b"\x01")[v % 6])
        else:
            out.append(v % vocab)
    return out


def one_ids(tok: Tokenizer, ids: list, skip: bool) -> None:
    bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < tok.vocab_size)]
    if bad:
        try:
            tok.decode(ids, skip_special=skip)
        except TokenizerError:
            pass
        else:
            raise Finding(f"decode accepted bad id {bad[0]!r}")
        dec = tok.stream_decoder(skip_special=skip)
        for i in ids:
            if i is bad[0]:
                break
            dec.push(i)
        dec.push(bad[0])  # must raise TokenizerError
        raise Finding(f"StreamDecoder.push accepted bad id {bad[0]!r}")
    text = tok.decode(ids, skip_special=skip)
    if _has_surrogate(text):
        raise Finding(f"decode returned a lone surrogate: {text!r:.200}")
    if stream(tok, ids, skip, prefix_check=True) != text:
        raise Finding("the stream's concatenation differs from decode")


def one(data: bytes, scratch: Path) -> None:
    if not data:
        return
    tok, sel, body = TOK, data[0], data[1:]
    mode, add_bos, skip = sel & 7, bool(sel & 8), bool(sel & 16)
    if mode <= 4:
        one_text(tok, text_of(mode, body), add_bos, skip)
    else:
        one_ids(tok, ids_of(mode, body, tok.vocab_size), skip)


TEXTS = [
    "hello  world\n\n", "<start_of_turn>user\n東京 😀\U0010ffff<end_of_turn>", "def f():\n\treturn 1",
    "emoji 😀🎉👍🏽 ZWJ 👨\u200d👩\u200d👧\u200d👦 flags 🇯🇵", "東京は日本の首都です。한국어 텍스트.",
    "  leading spaces, a  double space,\n\nnew lines\tand tabs   ", "a replacement char \ufffd", "",
    "<start_of_image><table>[multimodal]<unused7><bos<start_of_", "The Gemma 3 models are trained with distillation.",
]


def seeds(d: Path):
    for k, t in enumerate(TEXTS):
        yield bytes([k % 3 * 8 | 0]) + t.encode()
    yield bytes([1]) + b"bad \xff\xfe bytes \xed\xa0\x80"
    yield bytes([2]) + b"cesu \xed\xa0\x80\xed\xb0\x80 x"
    yield bytes([3]) + "utf16 東京".encode("utf-16-le") + b"\x00\xd8"
    yield bytes([4]) + bytes(range(0, 64)) + "é😀".encode()
    # ids: "<bos>hello" and an incomplete / complete euro sign in byte tokens, and some out of range
    yield bytes([5]) + b"".join(int(w).to_bytes(3, "little") for w in
                                [(5 << 20) | 2, (9 << 20) | 23391, 0xE2, 0x82, 0xAC, 0xE2, (5 << 20) | 106])
    yield bytes([6 | 16]) + b"".join(int(w).to_bytes(3, "little") for w in [(13 << 20) | 1, (14 << 20) | 3])
    yield bytes([7]) + b"".join(int(w).to_bytes(3, "little") for w in [(15 << 20) | 0, 0xF0, 0x9F])


if __name__ == "__main__":
    main(Target("tokenizer", one, (TokenizerError,), seeds, setup=setup, timeout_s=20,
                notes="Gemma 3 tokenizer of the embedded 270M GGUF: encode of text decoded 5 ways from the "
                      "bytes (lone surrogates -> TokenizerError), round trip decode(encode(s)) == "
                      "s.replace('\u2581', ' ') for all valid Unicode, decode and StreamDecoder on arbitrary "
                      "ids (bad ids -> TokenizerError; stream == decode, whole characters only)."))
