"""Fuzz Tokenizer.from_hf_dir on a Hugging Face folder whose tokenizer files come from the fuzzer.

An input is the folder's files, in a fixed order, separated by SEP: tokenizer.json, tokenizer.model,
tokenizer_config.json, added_tokens.json, special_tokens_map.json, config.json. An empty section means
the file is absent (from_hf_dir reads tokenizer.model first, else tokenizer.json; the last two are not
read today, they are there so a future reader of them is fuzzed too). The seeds are small real
tokenizer files: a Gemma-style BPE tokenizer.json (byte fallback, "▁" for space, the Gemma special
tokens, written by the `tokenizers` library) and a SentencePiece tokenizer.model spelled like Gemma's
(whitespace runs as real spaces), with the added-token files transformers writes next to them.

Oracle: from_hf_dir returns a Tokenizer or raises CheckpointError with a one-line message. A returned
tokenizer must work: encode of a few texts (special tokens included) gives ids in range that decode
without error, the StreamDecoder agrees with decode, every id decodes, and the chat template encodes.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Finding, Target, instrumented, main, write  # noqa: E402

with instrumented():
    from gemmalab.checkpoints.errors import CheckpointError
    from gemmalab.tokenizer import Tokenizer, TokenizerError

SEP = b"\n\xf5\xf5FILE\xf5\xf5\n"  # 0xF5 never occurs in UTF-8 (JSON) and not in the seeds' protobuf
NAMES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "added_tokens.json",
         "special_tokens_map.json", "config.json"]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<start_of_turn>", "<end_of_turn>",
            "<start_of_image>", "<end_of_image>"]
NORMAL = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁w", "▁wor", "or", "▁world", "ld",
          "u", "s", "us", "er", "user", "m", "mo", "de", "del", "model", "▁▁", "▁▁▁▁"]
TEXTS = ["hello world", "<start_of_turn>user\nhello<end_of_turn>\n", "  東京 😀 \U0010ffff\n\n", "<bos", ""]


def files_to_input(files: dict[str, bytes | str]) -> bytes:
    return SEP.join((files.get(n, b"").encode() if isinstance(files.get(n, b""), str) else files.get(n, b""))
                    for n in NAMES)


def one(data: bytes, scratch: Path) -> None:
    folder = scratch / "model"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    for name, body in zip(NAMES, data.split(SEP)):
        if body:
            write(folder, name, body)
    tok = Tokenizer.from_hf_dir(folder)
    exercise(tok)


def exercise(tok: Tokenizer) -> None:
    """A returned tokenizer must be usable: anything failing here is a finding (found at load, not later)."""
    n = tok.vocab_size
    for i in (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id):
        if not (isinstance(i, int) and 0 <= i < n):
            raise Finding(f"special id {i!r} outside the vocabulary of {n}")
    for text in TEXTS:
        try:
            ids = tok.encode(text)
        except TokenizerError as e:
            raise Finding(f"a loaded tokenizer cannot encode {text!r}: {e}") from e
        if not all(isinstance(i, int) and 0 <= i < n for i in ids):
            raise Finding(f"encode returned ids out of range: {ids[:20]}")
        s = tok.decode(ids)
        dec = tok.stream_decoder()
        if "".join(dec.push(i) for i in ids) + dec.flush() != s:
            raise Finding("stream decode differs from decode")
    every = list(range(min(n, 2048)))
    tok.decode(every)
    tok.decode(every, skip_special=True)
    tok.encode_chat([{"role": "user", "content": "hello"}])


def tokenizer_json() -> str:
    """A Gemma-style tokenizer.json: BPE with byte fallback, " " -> "▁", the Gemma decoder."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HF

    vocab = {p: i for i, p in enumerate(SPECIALS + ["\n"] + [f"<0x{b:02X}>" for b in range(256)] + NORMAL)}
    merges = [("h", "e"), ("l", "l"), ("ll", "o"), ("he", "llo"), ("▁", "w"), ("o", "r"), ("▁w", "or"), ("l", "d"),
              ("▁wor", "ld"), ("u", "s"), ("e", "r"), ("us", "er"), ("m", "o"), ("d", "e"), ("de", "l"),
              ("mo", "del"), ("▁", "▁"), ("▁▁", "▁▁")]
    merges = [(a, b) for a, b in merges if a + b in vocab]
    hf = HF(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Replace(" ", "▁")
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    hf.add_tokens([AddedToken("\n", special=False, normalized=False)])
    return hf.to_str()


def tokenizer_model() -> bytes:
    """A small SentencePiece BPE model spelled like Gemma's (whitespace runs as real spaces, <unk> UNKNOWN)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    mp = pb.ModelProto()
    mp.trainer_spec.model_type = pb.TrainerSpec.BPE
    mp.trainer_spec.unk_id, mp.trainer_spec.bos_id, mp.trainer_spec.eos_id, mp.trainer_spec.pad_id = 3, 2, 1, 0
    pieces = [(p, 3) for p in SPECIALS] + [("\n", 4), ("\n\n", 4), ("\t", 4)]
    pieces += [(f"<0x{b:02X}>", 6) for b in range(256)]
    pieces += [(p.replace("▁", " ") if set(p) == {"▁"} and len(p) > 1 else p, 1) for p in NORMAL]
    for i, (p, kind) in enumerate(pieces):
        mp.pieces.add(piece=p, score=-float(i), type=2 if p == "<unk>" else kind)
    return mp.SerializeToString()


def seeds(d: Path):
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": {"content": "<pad>"}, "unk_token": "<unk>",
              "added_tokens_decoder": {"6": {"content": "<start_of_turn>", "special": True}}}
    special_map = {"bos_token": {"content": "<bos>", "lstrip": False}, "eos_token": "<eos>",
                   "boi_token": "<start_of_image>", "image_token": "<image_soft_token>"}
    hf_config = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144}
    tj, tm = tokenizer_json(), tokenizer_model()
    assert SEP not in tm
    n_model = len(SPECIALS) + 3 + 256 + len(NORMAL)
    yield files_to_input({"tokenizer.json": tj, "tokenizer_config.json": json.dumps(config),
                          "special_tokens_map.json": json.dumps(special_map), "config.json": json.dumps(hf_config)})
    yield files_to_input({"tokenizer.json": tj})
    yield files_to_input({"tokenizer.model": tm, "tokenizer_config.json": json.dumps(config),
                          "added_tokens.json": json.dumps({"<image_soft_token>": n_model}),
                          "special_tokens_map.json": json.dumps(special_map)})
    yield files_to_input({"tokenizer.model": tm})
    yield files_to_input({"tokenizer_config.json": "[1, 2]", "added_tokens.json": "{}"})


if __name__ == "__main__":
    main(Target("hf_tokenizer", one, (CheckpointError,), seeds, timeout_s=20,
                notes="Tokenizer.from_hf_dir on a folder of fuzzed tokenizer.json / tokenizer.model / "
                      "tokenizer_config.json / added_tokens.json / special_tokens_map.json / config.json "
                      "(seeds: small real Gemma-style files); a tokenizer it returns must encode, decode, "
                      "stream and render the chat template."))
