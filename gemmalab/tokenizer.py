"""Gemma 3 tokenizer and chat template, without transformers.

The vocabulary comes from a GGUF file's metadata (`tokenizer.ggml.*`), a SentencePiece `tokenizer.model`
or a `tokenizer.json`. Encoding reproduces transformers' `GemmaTokenizer` (the reference), which is:

  1. added tokens are cut out of the raw text first, whole, leftmost-longest: every CONTROL piece
     (`<bos>`, `<start_of_turn>`, `<unused12>`, ...) and every USER_DEFINED one (`\\n`, `\\n\\n`, tab runs,
     `<start_of_image>`, `<table>`, `[multimodal]`, ...);
  2. the rest: `" "` -> `"▁"`, no NFKC, no dummy prefix, no whitespace folding, then BPE over the whole
     segment (no pre-split on spaces or digits) with byte fallback.

Step 2 runs in SentencePiece: we rebuild a BPE `ModelProto` from the vocabulary and load it from memory.
Two details make SentencePiece agree with the reference (spec §4.1, transformers
`integrations/gguf/gguf_tokenizer_mapping.py::gemma_tokenizer`):

  * Gemma files store the whitespace-run pieces (ids 138-167) as real spaces ("  "), which can never match
    text whose spaces became "▁". The reference respells them "▁▁"... and makes them ordinary BPE pieces;
    so do we.
  * Merge priority is the piece's position in the vocabulary (lower id merges first). We give every
    NORMAL piece the score -id, so SentencePiece's "highest score merges first" is the same order.

Decoding follows the reference decoder (`Replace("▁", " ") -> ByteFallback -> Fuse`) and renders special
tokens as their text unless skipped. Runs of byte-fallback tokens are decoded as UTF-8 with one U+FFFD
per byte that is not part of a valid character. (The reference replaces a whole run with U+FFFDs as soon
as any byte in it is bad, which no streaming decoder can reproduce; the two agree whenever a run has no
complete valid character next to the bad bytes, e.g. a truncated character at the end of a generation.)
"""
from __future__ import annotations

import codecs
import json
import operator
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .checkpoints.errors import CheckpointError

__all__ = ["Tokenizer", "StreamDecoder", "ChatTemplateError", "TokenizerError", "CheckpointError"]

# SentencePiece `ModelProto.SentencePiece.Type`; GGUF's `tokenizer.ggml.token_type` uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_SPACE = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered by the Gemma 3 chat template."""


class TokenizerNotFoundError(CheckpointError, FileNotFoundError):
    """A folder with neither tokenizer.model nor tokenizer.json (a CheckpointError, and still the
    FileNotFoundError it always was)."""


class TokenizerError(ValueError):
    """Input the tokenizer cannot take: text that is not valid Unicode (a lone surrogate, which has no
    UTF-8 encoding), or a token id that is not an integer in [0, vocab_size). One line, like every
    gemmalab error; files that cannot be read as a tokenizer raise CheckpointError instead."""


# ---------------------------------------------------------------------------------------------------------
# Byte-fallback decoding: one U+FFFD per bad byte (the reference's count for a run that is all bad).

def _bytewise_replace(exc: UnicodeDecodeError) -> tuple[str, int]:
    return "\ufffd" * (exc.end - exc.start), exc.end


_ERRORS = "gemmalab.bytewise_replace"
codecs.register_error(_ERRORS, _bytewise_replace)
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


# ---------------------------------------------------------------------------------------------------------
# The SentencePiece model we hand the plain-text segments to.

_VARINT = [bytes([i]) if i < 128 else bytes([(i & 0x7F) | 0x80, i >> 7]) for i in range(1 << 14)]


def _sentencepiece_proto(pieces: Sequence[str], types: Sequence[int], unk_id: int, bos_id: int,
                         eos_id: int, pad_id: int) -> bytes:
    """A serialised BPE `ModelProto` with the reference's normalisation.

    The 262k `pieces` are written as raw protobuf bytes (field 1, `SentencePiece{piece=1, score=2,
    type=3}`); building them through the protobuf API costs several times more. Protobuf concatenation
    is a merge, so the specs serialised by `sentencepiece_model_pb2` are simply prepended.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    mp = pb.ModelProto()
    ts = mp.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(pieces)
    ts.byte_fallback = True
    ts.split_digits = False  # the reference does not split digits (the vocabulary has no ASCII multi-digit piece)
    ts.split_by_whitespace = False
    ts.split_by_unicode_script = False
    ts.split_by_number = False
    ts.allow_whitespace_only_pieces = True
    ts.treat_whitespace_as_suffix = False
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = unk_id, bos_id, eos_id, pad_id
    ns = mp.normalizer_spec
    ns.name = "identity"  # no NFKC
    ns.add_dummy_prefix = False
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True  # " " -> "▁"
    # Every added token is cut out of the text before SentencePiece sees it, so SentencePiece must never
    # match one itself: USER_DEFINED pieces become CONTROL (never matched in text).
    sp_types = bytes(types).translate(bytes(CONTROL if t == USER_DEFINED else t for t in range(256)))
    # Merge order = vocabulary order (lower id first), as in the reference: score -id for NORMAL pieces.
    import numpy as np
    kinds = np.frombuffer(sp_types, np.uint8)
    scores = np.where(kinds == NORMAL, -np.arange(len(pieces), dtype=np.float32), np.float32(0))
    scores = scores.astype("<f4").tobytes()
    blob = _pieces_blob_numpy(pieces, sp_types, scores)
    if blob is None:
        blob = _pieces_blob(pieces, sp_types, scores)
    return mp.SerializeToString() + blob


def _pieces_blob(pieces: Sequence[str], types: bytes, scores: bytes) -> bytes:
    """Repeated field 1 of ModelProto: `SentencePiece{piece=1 (bytes), score=2 (float), type=3 (enum)}`."""
    raw = [p.encode("utf-8") for p in pieces]
    if max(map(len, raw), default=0) > 1000:
        raise ValueError("a vocabulary piece is longer than 1000 bytes")
    v = _VARINT  # every length below is < 2**14 (piece <= 1000 bytes), so one table lookup each
    return b"".join([b"\x0a%b\x0a%b%b\x15%b\x18%b" % (v[len(b) + 8 + len(v[len(b)])], v[len(b)], b,
                                                      scores[4 * i:4 * i + 4], v[t])
                     for i, (b, t) in enumerate(zip(raw, types))])


def _pieces_blob_numpy(pieces: Sequence[str], types: bytes, scores: bytes) -> bytes | None:
    """`_pieces_blob` without a Python loop (0.02 s instead of 0.25 s for 262k pieces).

    Needs every piece at most 118 bytes long and free of NUL, so that each record is exactly
    `0a <L+9> 0a <L> piece 15 <f32 score> 18 <type>` (11 + L bytes, one-byte varints); else None.
    """
    import numpy as np

    n = len(pieces)
    text = "\x00".join(pieces)
    if n == 0 or text.count("\x00") != n - 1:
        return None
    joined = np.frombuffer(text.encode("utf-8"), np.uint8)
    seps = np.flatnonzero(joined == 0)
    lengths = np.diff(np.concatenate(([-1], seps, [joined.size]))) - 1  # bytes per piece
    if lengths.max() > 118:  # the record length L + 9 must fit a one-byte varint
        return None
    data = np.delete(joined, seps)  # the piece bytes, back to back
    rec = lengths + 11
    rec_start = np.concatenate(([0], np.cumsum(rec)[:-1]))
    data_start = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    out = np.empty(int(rec.sum()), np.uint8)
    out[rec_start] = 0x0A
    out[rec_start + 1] = lengths + 9
    out[rec_start + 2] = 0x0A
    out[rec_start + 3] = lengths
    out[np.arange(data.size) + np.repeat(rec_start + 4 - data_start, lengths)] = data
    tail = rec_start + 4 + lengths
    out[tail] = 0x15
    out[tail[:, None] + np.arange(1, 5)] = np.frombuffer(scores, np.uint8).reshape(n, 4)
    out[tail + 5] = 0x18
    out[tail + 6] = np.frombuffer(types, np.uint8)
    return out.tobytes()


def _respell(piece: str) -> str:
    # Whitespace-run pieces stored with real spaces ("  ") -> "▁▁", as the reference does.
    return _SPACE * len(piece) if piece and " " in piece and not piece.strip() else piece


def _added_token_regex(tokens: Iterable[str]) -> re.Pattern | None:
    """One regex matching any of `tokens`, leftmost-longest (like the reference's Aho-Corasick matcher).

    Built as a trie so a position costs one character test, not one per token (there are 6k+ tokens).
    """
    trie: dict = {}
    for tok in tokens:
        if not tok:
            continue
        node = trie
        for ch in tok:
            node = node.setdefault(ch, {})
        node[""] = True

    def pattern(node: dict) -> str:
        # Alternatives start with distinct characters; a continuation is tried before stopping here, and
        # backtracking falls back to the longest token that did match.
        alts = [re.escape(ch) + pattern(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    if not trie:
        return None
    return re.compile(pattern(trie))


# ---------------------------------------------------------------------------------------------------------

class Tokenizer:
    """Gemma 3 tokenizer: `encode`/`decode`, special ids, the chat template and a streaming decoder."""

    def __init__(self, pieces: Sequence[str], types: Sequence[int], *, bos_id: int, eos_id: int, pad_id: int,
                 unk_id: int, encode_plain: Callable[[str], list[int]] | None = None,
                 encode_text: Callable[[str], list[int]] | None = None, source: str = ""):
        """Prefer the `from_*` constructors.

        `pieces`/`types` are the vocabulary (SentencePiece spelling, "▁" for space) and the piece types.
        Exactly one of `encode_plain` (text with no added tokens in it -> ids; we cut added tokens out
        first) and `encode_text` (any text -> ids, no BOS) does the encoding.
        """
        if (encode_plain is None) == (encode_text is None):
            raise TypeError("give exactly one of encode_plain and encode_text")
        self._pieces = list(pieces)
        self._types = bytes(types)
        self.vocab_size = len(self._pieces)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self._encode_plain = encode_plain
        self._encode_text = encode_text
        self._source = source
        self._piece_to_id: dict[str, int] | None = None
        # Added tokens: matched whole in text; CONTROL ones are "special" (dropped by skip_special).
        # (Index scans over the type bytes: a Python loop over 262k pieces costs a tenth of a second each.)
        self._added = {self._pieces[i]: i for i in _positions(self._types, (CONTROL, USER_DEFINED, UNKNOWN))
                       if self._pieces[i]}
        self._added_re = _added_token_regex(self._added) if encode_plain is not None else None
        self.start_of_turn_id = self._added.get("<start_of_turn>")
        self.end_of_turn_id = self._added.get("<end_of_turn>")
        self.stop_ids: tuple[int, ...] = tuple(
            i for i in (self.eos_id, self.end_of_turn_id) if i is not None)
        # Decoding tables: the text of each piece ("▁" -> " "; unused for byte pieces) and the value of each
        # byte-fallback piece.
        joined = "\x00".join(self._pieces)
        text = joined.replace(_SPACE, " ").split("\x00")
        self._text = text if len(text) == self.vocab_size else [p.replace(_SPACE, " ") for p in self._pieces]
        self._byte = {}
        for i in _positions(self._types, (BYTE,)):
            m = _BYTE_PIECE.fullmatch(self._pieces[i])
            if m is None:
                raise CheckpointError(f"{source or 'vocabulary'}: byte-fallback piece {i} is "
                                      f"{self._pieces[i]!r:.40}, expected '<0xXX>'")
            self._byte[i] = int(m.group(1), 16)

    # ---- constructors ----------------------------------------------------------------------------------

    @classmethod
    def _from_vocab(cls, pieces: list[str], types: list[int], *, bos_id: int | None, eos_id: int | None,
                    pad_id: int | None, unk_id: int | None, source: str) -> "Tokenizer":
        import sentencepiece as spm

        def find(i, name):
            if i is None or not 0 <= i < len(pieces):
                i = next((k for k, p in enumerate(pieces) if p == name), None)
            if i is None:
                raise CheckpointError(f"{source}: the vocabulary has no {name} token")
            return i

        unk_id, bos_id = find(unk_id, "<unk>"), find(bos_id, "<bos>")
        eos_id, pad_id = find(eos_id, "<eos>"), find(pad_id, "<pad>")
        valid = {NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE}
        types = bytearray(types) if set(types) <= valid else bytearray(t if t in valid else NORMAL for t in types)
        pieces = list(pieces)
        for i, p in enumerate(pieces):
            if " " in p and not p.strip():
                pieces[i] = _respell(p)
                if types[i] == USER_DEFINED:
                    types[i] = NORMAL  # the respelled whitespace runs are plain BPE pieces in the reference
        for m in re.finditer(bytes([UNKNOWN]), types):
            types[m.start()] = CONTROL  # SentencePiece allows a single UNKNOWN piece
        types[unk_id] = UNKNOWN  # GGUF files mark <unk> CONTROL; SentencePiece needs it UNKNOWN
        n_bytes = types.count(BYTE)
        if n_bytes != 256:
            raise CheckpointError(f"{source}: expected 256 byte-fallback pieces <0x00>..<0xFF>, found {n_bytes}")
        try:
            proto = _sentencepiece_proto(pieces, types, unk_id, bos_id, eos_id, pad_id)
        except ValueError as e:  # a piece too long for the record layout
            raise CheckpointError(f"{source}: {_one_line(e)}") from e
        try:
            sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own text
            raise CheckpointError(f"{source}: SentencePiece rejected the vocabulary: {_one_line(e)}") from e
        return cls(pieces, types, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, unk_id=unk_id,
                   encode_plain=sp.encode, source=source)

    @classmethod
    def from_gguf(cls, path_or_file) -> "Tokenizer":
        """From a GGUF file (a path or an open `GGUFFile`): the `tokenizer.ggml.*` metadata."""
        from .checkpoints.gguf_file import GGUFFile

        gf = path_or_file if isinstance(path_or_file, GGUFFile) else GGUFFile(path_or_file)
        source, meta = str(gf.path), gf.metadata
        model = meta.get("tokenizer.ggml.model")
        if model is None or "tokenizer.ggml.tokens" not in meta:
            raise CheckpointError(f"{source}: the GGUF has no tokenizer (no tokenizer.ggml.model/tokens)")
        if not isinstance(model, str) or model not in ("llama", "gemma", "gemma3"):
            raise CheckpointError(f"{source}: tokenizer.ggml.model={model!r:.60} is not a SentencePiece "
                                  "vocabulary; only Gemma's SentencePiece tokenizer ('llama') is supported")
        # A damaged file may hold any GGUF type under these keys: check before using them.
        pieces = meta["tokenizer.ggml.tokens"]
        if not isinstance(pieces, list) or not all(type(p) is str for p in pieces):
            raise CheckpointError(f"{source}: tokenizer.ggml.tokens is not an array of strings")
        types = meta.get("tokenizer.ggml.token_type")
        if types is not None:
            import numpy as np

            if not isinstance(types, np.ndarray) or types.dtype.kind not in "iu":
                raise CheckpointError(f"{source}: tokenizer.ggml.token_type is not an array of integers")
            types = types.tolist()
        else:
            types = [BYTE if _BYTE_PIECE.fullmatch(p) else NORMAL for p in pieces]
        if len(types) != len(pieces):
            raise CheckpointError(f"{source}: {len(pieces)} tokens but {len(types)} token types")
        ids = {}
        for key in ("bos", "eos", "padding", "unknown"):
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            if i is not None and type(i) is not int:  # an int out of range: found by name instead
                raise CheckpointError(f"{source}: tokenizer.ggml.{key}_token_id is {i!r:.40}, not a token id")
            ids[key] = i
        return cls._from_vocab(pieces, list(types), bos_id=ids["bos"], eos_id=ids["eos"],
                               pad_id=ids["padding"], unk_id=ids["unknown"], source=source)

    @classmethod
    def from_hf_dir(cls, path) -> "Tokenizer":
        """From a Hugging Face model folder: `tokenizer.model` (SentencePiece) if present, else `tokenizer.json`.

        With `tokenizer.model`, tokens that `added_tokens.json` / `tokenizer_config.json` add past the
        SentencePiece vocabulary (Gemma 3's `<image_soft_token>` = 262144) are appended.
        A folder whose files cannot be read as a tokenizer: CheckpointError (TokenizerNotFoundError, also a
        FileNotFoundError, when it has neither file).
        """
        folder = Path(os.fspath(path))
        if folder.is_file():
            folder = folder.parent
        spm_file, json_file = folder / "tokenizer.model", folder / "tokenizer.json"
        config = _read_json(folder / "tokenizer_config.json", dict) or {}
        if spm_file.is_file():
            return cls._from_sentencepiece_file(spm_file, folder, config)
        if json_file.is_file():
            return cls._from_tokenizer_json(json_file, config)
        raise TokenizerNotFoundError(
            f"no tokenizer in {folder}: expected tokenizer.model (SentencePiece) or tokenizer.json")

    @classmethod
    def _from_sentencepiece_file(cls, spm_file: Path, folder: Path, config: dict) -> "Tokenizer":
        from sentencepiece import sentencepiece_model_pb2 as pb

        mp = pb.ModelProto()
        try:
            mp.ParseFromString(spm_file.read_bytes())
            # Only pieces and types are kept: like the reference we merge in vocabulary order (scores ignored).
            pieces = [p.piece for p in mp.pieces]
            types = [p.type for p in mp.pieces]
        except Exception as e:  # protobuf's DecodeError, or a piece that is not UTF-8
            raise CheckpointError(f"{spm_file} is not a SentencePiece model: {_one_line(e)}") from e
        if not pieces:
            raise CheckpointError(f"{spm_file} is not a SentencePiece model (no pieces)")
        bad = next((i for i, p in enumerate(pieces) if not isinstance(p, str)), None)
        if bad is not None:  # protobuf hands proto2 `string` fields that are not UTF-8 back as bytes
            raise CheckpointError(f"{spm_file}: piece {bad} is not UTF-8: {pieces[bad]!r:.40}")
        if mp.trainer_spec.model_type != pb.TrainerSpec.BPE:
            raise CheckpointError(f"{spm_file}: only BPE SentencePiece models are supported (Gemma's kind)")
        # Tokens added on top of the SentencePiece model (HF conventions).
        extra: dict[int, tuple[str, bool]] = {}
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise CheckpointError(f"{folder}/tokenizer_config.json: added_tokens_decoder must be an object")
        for i, d in decoder.items():
            if not isinstance(d, dict) or not isinstance(d.get("content"), str):
                raise CheckpointError(f"{folder}/tokenizer_config.json: added_tokens_decoder[{i!r:.40}] must be "
                                      "an object with a string 'content'")
            extra[_added_id(i, folder)] = (d["content"], bool(d.get("special", False)))
        for content, i in (_read_json(folder / "added_tokens.json", dict) or {}).items():
            extra.setdefault(_added_id(i, folder), (content, True))
        for i in sorted(extra):
            content, special = extra[i]
            if i < len(pieces):
                if pieces[i] == content and types[i] == NORMAL:
                    types[i] = CONTROL if special else USER_DEFINED
            elif i == len(pieces):
                pieces.append(content)
                types.append(CONTROL if special else USER_DEFINED)
            else:
                raise CheckpointError(f"{folder}: added token {content!r:.40} has id {i}, past the vocabulary "
                                      f"end {len(pieces)} with a gap")
        ts = mp.trainer_spec
        ids = {name: (getattr(ts, f"{name}_id") if getattr(ts, f"{name}_id") >= 0 else None)
               for name in ("bos", "eos", "pad", "unk")}
        ids.update(_config_special_ids(config, pieces))
        return cls._from_vocab(pieces, types, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
                               unk_id=ids["unk"], source=str(spm_file))

    @classmethod
    def _from_tokenizer_json(cls, json_file: Path, config: dict) -> "Tokenizer":
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as e:  # pragma: no cover
            raise ImportError(f"reading {json_file} needs the `tokenizers` package: pip install tokenizers") from e
        try:
            backend = HFTokenizer.from_file(str(json_file))
            vocab = backend.get_vocab(with_added_tokens=True)
            added = backend.get_added_tokens_decoder()
        except BaseException as e:  # tokenizers' Exception, or a Rust panic (pyo3's PanicException)
            _reraise_fatal(e)
            raise CheckpointError(f"{json_file} is not a readable tokenizer.json: {_one_line(e)}") from e
        if not vocab:
            raise CheckpointError(f"{json_file}: the vocabulary is empty")
        # Gemma's kind, checked now so that a file that loads can encode any text later: a BPE model with
        # byte fallback, all 256 <0xXX> pieces and its unk token in the vocabulary (tokenizers itself only
        # notices a missing unk token when a text needs it).
        model = backend.model
        if type(model).__name__ != "BPE" or not getattr(model, "byte_fallback", False):
            raise CheckpointError(f"{json_file}: the model is {type(model).__name__}"
                                  f"{'' if type(model).__name__ != 'BPE' else ' without byte_fallback'}; "
                                  "only Gemma's kind (BPE with byte fallback) is supported")
        missing = sum(f"<0x{b:02X}>" not in vocab for b in range(256))
        if missing:
            raise CheckpointError(f"{json_file}: {missing} of the 256 byte-fallback pieces <0x00>..<0xFF> are missing")
        if model.unk_token is not None and model.unk_token not in vocab:
            raise CheckpointError(f"{json_file}: the unk token {model.unk_token!r:.40} is not in the vocabulary")
        n = max(vocab.values()) + 1
        if n > 2 * len(vocab) + 1024:  # ids with gaps are allowed, but not a table sized by one bogus id
            raise CheckpointError(f"{json_file}: token id {n - 1} for a vocabulary of {len(vocab)} tokens")
        pieces = [""] * n
        for piece, i in vocab.items():
            pieces[i] = piece
        types = [BYTE if _BYTE_PIECE.fullmatch(p) else NORMAL for p in pieces]
        for i, tok in added.items():
            if 0 <= i < n:
                types[i] = CONTROL if tok.special else USER_DEFINED
        ids = _config_special_ids(config, pieces)

        def encode_text(text: str) -> list[int]:
            try:
                return backend.encode(text, add_special_tokens=False).ids
            except BaseException as e:  # a tokenizer.json whose pipeline fails on this text
                _reraise_fatal(e)
                raise TokenizerError(f"{json_file}: the tokenizer failed on this text: {_one_line(e)}") from e

        def find(name):
            return ids.get(name, vocab.get(f"<{name}>"))

        bos, eos, pad, unk = (find(k) for k in ("bos", "eos", "pad", "unk"))
        if bos is None or eos is None:
            raise CheckpointError(f"{json_file}: cannot tell the <bos>/<eos> tokens")
        return cls(pieces, types, bos_id=bos, eos_id=eos, pad_id=pad if pad is not None else eos,
                   unk_id=unk if unk is not None else eos, encode_text=encode_text, source=str(json_file))

    # ---- vocabulary ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self._source!r})"

    def token_to_id(self, piece: str) -> int | None:
        """Id of a piece in SentencePiece spelling ("▁the", "<end_of_turn>", "<0x0A>"), or None."""
        if self._piece_to_id is None:
            self._piece_to_id = {p: i for i, p in enumerate(self._pieces)}
        return self._piece_to_id.get(piece)

    def id_to_piece(self, i: int) -> str:
        return self._pieces[self._check_id(i)]

    def is_special(self, i: int) -> bool:
        """True for CONTROL tokens (<bos>, <eos>, <start_of_turn>, <unusedN>, ...): what skip_special drops."""
        return self._types[self._check_id(i)] in (CONTROL, UNKNOWN)

    def _check_id(self, i) -> int:
        """`i` as an int in [0, vocab_size), else TokenizerError (ints, bools, numpy / 0-d tensor ints;
        not floats or strings, which would silently truncate or parse)."""
        try:
            i = operator.index(i)
        except TypeError:
            raise TokenizerError(f"token id {i!r:.40} is not an integer ({type(i).__name__})") from None
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {i} is out of range for a vocabulary of {self.vocab_size}"
                                 if i.bit_length() < 128 else
                                 f"token id of {i.bit_length()} bits is out of range for a vocabulary "
                                 f"of {self.vocab_size}")
        return i

    # ---- encode / decode -------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (`<start_of_turn>`) become their ids.

        Any valid Unicode text encodes (byte fallback covers every character), and
        `decode(encode(text, add_bos=False)) == text` unless the text contains "\u2581" (SentencePiece's
        visible space, which decodes as " ", as in the reference). A lone surrogate ("\ud800", e.g. from
        JSON's "\\ud800" escape or bytes read with errors="surrogateescape") is not Unicode text and has
        no UTF-8 bytes to fall back to: TokenizerError, as the reference refuses it too.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        _check_unicode(text)
        ids = [self.bos_id] if add_bos else []
        if self._encode_text is not None:
            ids += self._encode_text(text)
            return ids
        pos = 0
        if self._added_re is not None:
            added, plain = self._added, self._encode_plain
            for m in self._added_re.finditer(text):
                start = m.start()
                if start > pos:
                    ids += plain(text[pos:start])
                ids.append(added[m.group()])
                pos = m.end()
        if pos < len(text):
            ids += self._encode_plain(text[pos:])
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of `ids` (ints, or a 1-D tensor/array). Special tokens render as their text unless skipped.

        An id that is not an integer in [0, vocab_size) (negative, too large, a float): TokenizerError.
        Byte-fallback runs that are not valid UTF-8 decode with one U+FFFD per bad byte.
        """
        out: list[str] = []
        dec = _Utf8Decoder(_ERRORS)
        pending = False
        types, text, byte = self._types, self._text, self._byte
        for i in _as_id_list(ids):
            i = self._check_id(i)
            t = types[i]
            if t == BYTE:
                out.append(dec.decode(bytes((byte[i],))))
                pending = True
                continue
            if skip_special and t in (CONTROL, UNKNOWN):
                continue  # dropped before the decoder runs, so it does not split a byte run
            if pending:
                out.append(dec.decode(b"", final=True))
                dec.reset()
                pending = False
            out.append(text[i])
        if pending:
            out.append(dec.decode(b"", final=True))
        return "".join(out)

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special)

    # ---- chat ------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt string the Gemma 3 Jinja chat template renders (spec §4.3), starting with "<bos>"."""
        return self.id_to_piece(self.bos_id) + render_chat(messages, add_generation_prompt)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the chat prompt, with exactly one BOS (the one the template writes).

        Like the reference (`apply_chat_template(tokenize=True)`), special-token text inside message
        contents is tokenized as those special tokens.
        """
        return [self.bos_id] + self.encode(render_chat(messages, add_generation_prompt), add_bos=False)


def _positions(types: bytes, wanted: tuple[int, ...]) -> list[int]:
    return [m.start() for m in re.finditer(b"[" + re.escape(bytes(wanted)) + b"]", types)]


def _as_id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):  # torch tensor / numpy array
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    if isinstance(ids, (str, bytes)):  # iterable, but not ids: "12" would decode as ["1", "2"]
        raise TokenizerError(f"token ids must be a sequence of ints, not {type(ids).__name__}")
    try:
        return list(ids)
    except TypeError:
        raise TokenizerError(f"token ids must be a sequence of ints, not {type(ids).__name__}") from None


def _check_unicode(text: str) -> None:
    """TokenizerError for a lone surrogate, which SentencePiece (and the reference) cannot take."""
    if not text.isascii():  # O(1) for ASCII strings
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(f"the text has a lone surrogate U+{ord(text[e.start]):04X} at index {e.start}: "
                                 "not valid Unicode (decode bytes with errors='replace', not "
                                 "'surrogateescape')") from None


def _read_json(path: Path, kind: type | None = None) -> Any:
    """The JSON in `path` (None if there is no such file); CheckpointError if it is not JSON (or not `kind`)."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise CheckpointError(f"{path} is not valid JSON: {_one_line(e)}") from e
    if kind is not None and not isinstance(value, kind):
        raise CheckpointError(f"{path} must hold a JSON {'object' if kind is dict else kind.__name__}, "
                              f"not {type(value).__name__}")
    return value


def _added_id(key: Any, folder: Path) -> int:
    """An added token's id from tokenizer_config.json ("262144") or added_tokens.json (262144)."""
    try:
        i = int(key) if isinstance(key, str) else operator.index(key)
    except (TypeError, ValueError):
        raise CheckpointError(f"{folder}: added token id {key!r:.40} is not an integer") from None
    if i < 0:
        raise CheckpointError(f"{folder}: added token id {i} is negative")
    return i


def _one_line(e: BaseException, limit: int = 300) -> str:
    """A wrapped library error as one line (gemmalab errors are one line; theirs may not be)."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= limit else msg[:limit] + "..."


def _reraise_fatal(e: BaseException) -> None:
    """Let interpreter-level exceptions through; everything else (incl. pyo3's PanicException, a
    BaseException) is the library's verdict on a bad input."""
    if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError, RecursionError)):
        raise e


def _config_special_ids(config: dict, pieces: list[str]) -> dict[str, int]:
    """bos/eos/pad/unk ids named in a tokenizer_config.json (as strings or {"content": ...})."""
    index = None
    out = {}
    for name in ("bos", "eos", "pad", "unk"):
        tok = config.get(f"{name}_token")
        if isinstance(tok, dict):
            tok = tok.get("content")
        if isinstance(tok, str):
            if index is None:
                index = {p: i for i, p in enumerate(pieces)}
            if tok in index:
                out[name] = index[tok]
    return out


# ---------------------------------------------------------------------------------------------------------
# Chat template, in plain Python. It renders exactly what the Jinja template of spec §4.3 renders (minus the
# leading bos_token) for every conversation that template accepts, and refuses a few it would render silently
# wrong: an unknown role, a system message that is not first or is the only message, content items of an
# unknown type, and dict content.

_ROLE_NAMES = {"user": "user", "assistant": "model", "model": "model"}


# The Gemma 3 Jinja chat template, verbatim from spec 4.3 ([HFconv] `_CHAT_TEMPLATE`, the hub's
# tokenizer_config). `render_chat` below is its plain-Python equivalent; exports ship this text.
CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}{%- set role = "model" -%}
    {%- else -%}{%- set role = message['role'] -%}{%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}
        {%- endfor -%}
    {%- else -%}{{ raise_exception("Invalid content type") }}{%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}
"""


def _short_repr(x: Any, limit: int = 80) -> str:
    """repr for an error message: one line, at most `limit` characters, never failing (an int of 5000
    digits has no repr)."""
    try:
        r = repr(x)
    except Exception:  # noqa: BLE001 - ValueError for huge ints, anything from a user type
        r = f"<{type(x).__name__}>"
    return r if len(r) <= limit else r[:limit] + "..."


def render_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """The Gemma 3 template's text for `messages` (without "<bos>"); ChatTemplateError, one line, for any
    list it cannot render (bad container, missing or non-string role, misplaced system message,
    roles not alternating, content that is not a string or a list of text/image items)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                                f"not {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("messages is empty: give at least one user message")
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"message {k} must be a dict with 'role' and 'content', not {type(m).__name__}")
        if "role" not in m:
            raise ChatTemplateError(f"message {k} has no 'role'")

    first_user_prefix = ""
    loop_messages = messages
    if messages[0]["role"] == "system":
        content = messages[0].get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, (list, tuple)) and content and isinstance(content[0], Mapping) \
                and isinstance(content[0].get("text"), str):
            text = content[0]["text"]  # the template uses only the first item's text
        else:
            raise ChatTemplateError("the system message content must be a string or a list starting with a "
                                    "{'type': 'text', 'text': ...} item")
        first_user_prefix = text + "\n\n"  # not trimmed: the template does not trim it
        loop_messages = messages[1:]
        if not loop_messages:
            raise ChatTemplateError("a system message must be followed by a user message (Gemma has no system "
                                    "turn: the system text is put at the start of the first user turn)")

    parts: list[str] = []
    for k, message in enumerate(loop_messages):
        role = message["role"]
        index = k + (len(messages) - len(loop_messages))
        if role == "system":
            raise ChatTemplateError(f"message {index}: a system message is only allowed first")
        if not isinstance(role, str) or role not in _ROLE_NAMES:
            raise ChatTemplateError(f"message {index}: unknown role {_short_repr(role)}; "
                                    "expected 'system' (first only), 'user' or 'assistant'")
        if (role == "user") != (k % 2 == 0):
            raise ChatTemplateError("Conversation roles must alternate user/assistant/user/assistant/... "
                                    f"(message {index} has role {role!r})")
        parts.append("<start_of_turn>" + _ROLE_NAMES[role] + "\n" + (first_user_prefix if k == 0 else ""))
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content.strip())  # Jinja's `trim` is str.strip()
        elif isinstance(content, (list, tuple)):
            for j, item in enumerate(content):
                kind = item.get("type") if isinstance(item, Mapping) else None
                if kind == "image":
                    parts.append("<start_of_image>")
                elif kind == "text":
                    text = item.get("text")
                    if not isinstance(text, str):
                        raise ChatTemplateError(f"message {index}, item {j}: a text item needs a string 'text'")
                    parts.append(text.strip())
                else:
                    raise ChatTemplateError(f"message {index}, item {j}: content items must be dicts with "
                                            f"'type' 'text' or 'image', got {_short_repr(item)}")
        else:
            raise ChatTemplateError(f"Invalid content type: message {index} content must be a string or a list "
                                    f"of {{'type': 'text'|'image', ...}} items, not {type(content).__name__}")
        parts.append("<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------

class StreamDecoder:
    """Turns ids into text one at a time; the pieces concatenate to exactly `tokenizer.decode(ids)`.

    Byte-fallback tokens (`<0xE2>` ...) are held until their character is complete, so `push` never
    returns part of a UTF-8 character. There is no leading-space handling to undo: Gemma has no dummy
    prefix, each "▁" is a space.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip = skip_special
        self._dec = _Utf8Decoder(_ERRORS)
        self._pending = False

    def push(self, token_id: int) -> str:
        """The text `token_id` completes ("" while a character's bytes are incomplete); TokenizerError for
        an id that is not an int in [0, vocab_size), leaving the decoder as it was."""
        tok = self._tok
        i = tok._check_id(token_id)
        t = tok._types[i]
        if t == BYTE:
            self._pending = True
            return self._dec.decode(bytes((tok._byte[i],)))
        if self._skip and t in (CONTROL, UNKNOWN):
            return ""
        return self._close_bytes() + tok._text[i]

    def flush(self) -> str:
        """Text still held back (an unfinished byte run, rendered with U+FFFD); the decoder can be reused."""
        return self._close_bytes()

    def _close_bytes(self) -> str:
        if not self._pending:
            return ""
        s = self._dec.decode(b"", final=True)
        self._dec.reset()
        self._pending = False
        return s
