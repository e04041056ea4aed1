"""A synthetic chat task for end-to-end training tests: tokenizer, data, exact-match accuracy.

The task is two-digit addition as a chat: user "37+45" -> model "82". Every digit, "+" and the
template's words "user" / "model" are single pieces, so a whole record
`<bos><start_of_turn>user\n37+45<end_of_turn>\n<start_of_turn>model\n82<end_of_turn>\n` is 18 tokens
(19 with a three-digit sum), of which the answer digits and <end_of_turn> are trained.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

# Gemma's special ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3; then the chat-template tokens.
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
USER_DEFINED = ["\n"]
# BPE pieces: the letters of "user" / "model" and the merges that rebuild them, digits, operators.
NORMAL = (["▁"] + [str(d) for d in range(10)] + ["+", "="]
          + ["u", "s", "e", "r", "m", "o", "d", "l", "us", "er", "user", "mo", "de", "del", "model"])


def write_vocab_gguf(path: str | Path, tokens: list[str], scores: list[float], types: list[int]) -> Path:
    """A GGUF holding only a SentencePiece ("llama") vocabulary with Gemma's special ids."""
    import gguf
    path = Path(path)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tokenizer(path: str | Path) -> Path:
    """A SentencePiece (BPE) vocabulary in a GGUF: Gemma's specials, 256 byte pieces, the task's pieces."""
    tokens = SPECIALS + USER_DEFINED + [f"<0x{b:02X}>" for b in range(256)] + NORMAL
    types = [3] * len(SPECIALS) + [4] * len(USER_DEFINED) + [6] * 256 + [1] * len(NORMAL)
    n_fixed = len(SPECIALS) + len(USER_DEFINED) + 256
    # Longer merges score higher, so "us"+"er" -> "user" and "mo"+"del" -> "model" win.
    scores = [-1000.0] * n_fixed + [float(len(p)) for p in NORMAL]
    return write_vocab_gguf(path, tokens, scores, types)


def addition_split(n_heldout: int = 200, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """All 8100 (prompt, answer) pairs ("37+45", "82") of two-digit numbers, split into (train, held-out)."""
    pairs = [(f"{a}+{b}", str(a + b)) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return pairs[n_heldout:], pairs[:n_heldout]


def chat_record(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}]}


def write_jsonl(path: str | Path, pairs, seed: int = 0) -> Path:
    """One chat record per (prompt, answer) pair, in a random order."""
    order = list(pairs)
    random.Random(seed).shuffle(order)
    path = Path(path)
    with open(path, "w") as f:
        for p, a in order:
            f.write(json.dumps(chat_record(p, a)) + "\n")
    return path


@torch.no_grad()
def exact_match(model, tokenizer, pairs, max_new_tokens: int = 8, batch_size: int = 256
                ) -> tuple[float, list[tuple[str, str, str]]]:
    """Greedy-generation accuracy on (prompt, answer) pairs: the decoded answer, ended by a stop
    token, must equal the expected one exactly.

    Returns (accuracy, [(prompt, expected, got)] for the misses).
    """
    from gemmalab.generate import SamplingParams, generate_steps

    model.eval()
    stops = tuple(tokenizer.stop_ids)
    misses, correct = [], 0
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        prompts = [tokenizer.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)
                   for p, _ in chunk]
        out: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        for tokens, _ in generate_steps(model, prompts, max_new_tokens, SamplingParams(temperature=0),
                                        stop_ids=stops, pad_id=tokenizer.pad_id):
            for i, t in enumerate(tokens.tolist()):
                if done[i]:
                    continue
                if t in stops:
                    done[i] = True
                else:
                    out[i].append(t)
        for (p, want), ids, finished in zip(chunk, out, done):
            # the embedding has more rows than the tokenizer has pieces: an untrained model may
            # pick an id with no piece, which is simply wrong
            got = (tokenizer.decode(ids) if all(i < tokenizer.vocab_size for i in ids)
                   else repr(ids))
            if finished and got == want:
                correct += 1
            else:
                misses.append((p, want, got))
    return correct / len(pairs), misses


def load_trained(out_dir: str | Path, preset: str):
    """A fresh model of `preset` holding the weights of the latest checkpoint under out_dir."""
    from safetensors.torch import load_file

    from gemmalab.config import get_config
    from gemmalab.model import Gemma3

    ckpts = Path(out_dir) / "checkpoints"
    latest = (ckpts / "latest").read_text().strip()
    model = Gemma3(get_config(preset))
    model.load_state_dict(load_file(str(ckpts / latest / "model.safetensors")), strict=True)
    return model.eval()
