"""A Bradley-Terry reward model: a Gemma 3 backbone and a scalar head, saved, loaded, merged, and
used as a reward term.

    RewardHead         w . h for the final hidden state h of each row's LAST real token (d -> 1, no
                       bias: the Bradley-Terry loss only sees differences of scores)
    RewardModel        backbone + head; scores(input_ids, positions, segment_ids, last_index) -> (B,)
    encode             prompt + completion -> ids, the way `gemmalab train rm` reads its pairs
    save_reward_model  an RM directory, written atomically (reward_model.json + .safetensors)
    load_reward_model  (model, tokenizer, meta) from an RM directory, a `train rm` run or checkpoint
    average_reward_models  WARM (Rame et al. 2024): the weight average of M members
    RewardModelTerm    the Reward protocol (rewards.base) over a reward model, batched

The score is read where TRL's RewardTrainer and transformers' *ForSequenceClassification read it:
at the last non-pad token. With the chat template that is the completion's closing <end_of_turn>
(the token the sampler stops at), with plain text the <eos> after the text.

What an RM directory records (reward_model.json): the backbone's identity, `base_hash` = sha256 of
the frozen base's Gemma3Config and where it came from (the model path as configured, or the preset,
its `model.arch` and the init seed that drew its random weights), and what trains
(`trainable`: "lora" with rank / alpha / scale / targets, "top_blocks" with their number, or "head");
the .safetensors holds only those tensors (LoRA factors or top-block weights, and `head.weight`).
Loading rebuilds the base from that record and refuses one whose hash differs; merging refuses
members of different bases, tensor names or shapes (train.averaging).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple, Sequence

import torch
from torch import nn

from .base import Problem, RewardResult, failed

__all__ = ["RewardHead", "RewardModel", "LoadedRewardModel", "META", "TENSORS", "base_identity",
           "encode", "rows_batch", "trainable_keys", "save_reward_model", "write_reward_model",
           "read_reward_model", "resolve_reward_model", "load_reward_model", "score_sequences",
           "average_reward_models", "RewardModelTerm", "TRAINABLE", "TEMPLATES"]

META = "reward_model.json"
TENSORS = "reward_model.safetensors"
FORMAT = "gemmalab-reward-model"
TRAINABLE = ("lora", "top_blocks", "head")
TEMPLATES = ("chat", "text")


class RewardHead(nn.Module):
    """A scalar linear head w . h (d -> 1, no bias), computed in fp32 even under autocast."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, hidden_size))

    @torch.no_grad()
    def reset(self, seed: int, std: float) -> None:
        """Normal(0, std) from a generator of its own (CPU, then copied): the same seed gives the
        same head on every device and whatever ran before (the shared init of WARM members)."""
        g = torch.Generator().manual_seed(seed)
        self.weight.copy_(torch.randn(self.weight.shape, generator=g) * std)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., d) -> (...)
        with torch.autocast(h.device.type, enabled=False):
            return (h.float() @ self.weight.float().t()).squeeze(-1)


class RewardModel(nn.Module):
    """backbone (a Gemma3, maybe with LoRA adapters) + RewardHead."""

    def __init__(self, backbone: nn.Module, head: RewardHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def scores(self, input_ids: torch.Tensor, positions: torch.Tensor, segment_ids: torch.Tensor,
               last_index: torch.Tensor) -> torch.Tensor:
        """(B,) scores of B rows (B, T): the head on the final hidden state at each row's
        `last_index` (its last real token; padding after it has position -1 and segment -1)."""
        h = self.backbone.hidden_states(input_ids, positions, segment_ids=segment_ids)  # (B, T, d)
        rows = torch.arange(h.shape[0], device=h.device)
        return self.head(h[rows, last_index.to(h.device)])  # (B,)

    forward = scores


class LoadedRewardModel(NamedTuple):
    model: RewardModel
    tokenizer: object
    meta: dict


# ---------------------------------------------------------------------------------------------------
# Identity of the frozen base, and what trains

def base_identity(config, *, path: str | None = None, preset: str | None = None, arch: dict | None = None,
                  init_seed: int | None = None, tokenizer: str | None = None) -> tuple[dict, str]:
    """(the base record, its sha256): the Gemma3Config and where the weights came from (the model path
    as configured, None = the embedded 270M; or the preset, its arch overrides, the seed of its
    random init and its tokenizer file). Members trained on one base share the hash; merges and
    loads check it."""
    if preset:
        source = {"preset": preset, "arch": dict(arch or {}), "init_seed": int(init_seed or 0),
                  "tokenizer": None if tokenizer is None else str(tokenizer)}
    else:
        if path is None:
            from ..._paths import default_model_path
            shown = f"embedded:{default_model_path().name}"
        else:
            shown = str(path)
        source = {"path": shown}
    record = {"config": dataclasses.asdict(config), "source": source}
    blob = json.dumps(record, sort_keys=True, default=str).encode()
    return record, hashlib.sha256(blob).hexdigest()


def trainable_keys(keys, meta: dict) -> list[str]:
    """The names (of RewardModel's state dict) an RM of this meta trains and saves, sorted."""
    kind = meta["trainable"]
    if kind == "lora":
        mine = [k for k in keys if ".lora_" in k]
    elif kind == "top_blocks":
        n = meta["base"]["config"]["num_hidden_layers"]
        top = tuple(f"backbone.layers.{i}." for i in range(n - int(meta["top_blocks"]), n))
        mine = [k for k in keys if k.startswith(top) or k == "backbone.norm.weight"]
    elif kind == "head":
        mine = []
    else:
        raise ValueError(f"unknown reward-model trainable kind {kind!r}; valid: {', '.join(TRAINABLE)}")
    return sorted(mine + ["head.weight"])


# ---------------------------------------------------------------------------------------------------
# Text -> rows

def encode(tokenizer, prompt: str, completion: str, template: str, seq_len: int) -> list[int]:
    """The ids a reward model scores for (prompt, completion).

    "chat": the user turn, the generation prompt, the completion and its <end_of_turn>, exactly the
    prompt + completion of `train.data.split_prompt` (what the policy's sampler produces after
    `encode_chat(..., add_generation_prompt=True)`); "text": `<bos> prompt+completion <eos>` as
    `train.data.tokenize_record` encodes plain text (the strings are joined as given).
    Longer than seq_len: the start of the prompt's text is cut, keeping <bos> and (chat) the turn
    markers around it, so the row stays a well-formed chat and the completion and the scored last
    token are kept; only a completion that alone does not fit loses its own start. Raises
    train.data.DataError for text the tokenizer cannot take.
    """
    from ..data import _check_record, split_prompt, tokenize_record

    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise TypeError("prompt and completion must be strings")
    if template == "chat":
        record = _check_record({"messages": [{"role": "user", "content": prompt},
                                             {"role": "model", "content": completion}]})
        p, c = split_prompt(record, tokenizer)
        ids = p + c
        if len(ids) > seq_len:  # the turn markers: what p shares with the prompt of an empty text
            empty, _ = split_prompt(_check_record({"messages": [{"role": "user", "content": ""},
                                                                {"role": "model", "content": completion}]}),
                                    tokenizer)
            head = next((i for i, (a, b) in enumerate(zip(p, empty)) if a != b), min(len(p), len(empty)))
            tail = next((i for i, (a, b) in enumerate(zip(reversed(p), reversed(empty))) if a != b),
                        min(len(p), len(empty)))
            tail = min(tail, len(p) - head, len(empty) - head)
            room = seq_len - head - tail - len(c)
            if room >= 0:
                return p[:head] + p[head:len(p) - tail][len(p) - tail - head - room:] + p[len(p) - tail:] + c
            keep = seq_len - head - tail  # the completion alone is too long: its start goes
            if keep > 0:
                return p[:head] + p[len(p) - tail:] + c[len(c) - keep:]
            ids = p[:head] + p[len(p) - tail:] + c
            return ids[:1] + ids[len(ids) - (seq_len - 1):]
    elif template == "text":
        ids, _ = tokenize_record(_check_record({"text": prompt + completion}), tokenizer)
    else:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, not {template!r}")
    if len(ids) > seq_len:
        ids = ids[:1] + ids[len(ids) - (seq_len - 1):]
    return ids


def rows_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows padded at the end to the longest: input_ids, positions (-1 on padding), segment_ids
    (0, -1 on padding), each (N, T), and last_index (N,)."""
    T = max(len(s) for s in seqs)
    n = len(seqs)
    ids = torch.full((n, T), pad_id, dtype=torch.long)
    pos = torch.full((n, T), -1, dtype=torch.long)
    seg = torch.full((n, T), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        pos[i, :len(s)] = torch.arange(len(s))
        seg[i, :len(s)] = 0
    last = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)
    return {"input_ids": ids, "positions": pos, "segment_ids": seg, "last_index": last}


@torch.no_grad()
def score_sequences(model: RewardModel, seqs: Sequence[Sequence[int]], pad_id: int,
                    batch_size: int = 16) -> torch.Tensor:
    """(N,) fp32 scores of token sequences, `batch_size` rows per forward, model in eval mode."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for s in range(0, len(seqs), batch_size):
            b = {k: v.to(device) for k, v in rows_batch(seqs[s:s + batch_size], pad_id).items()}
            out.append(model.scores(b["input_ids"], b["positions"], b["segment_ids"], b["last_index"])
                       .float().cpu())
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


# ---------------------------------------------------------------------------------------------------
# Files

def write_reward_model(directory: str | Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an RM directory atomically (train.checkpoint.write_dir_atomic): a reader never sees
    half a reward model."""
    from safetensors.torch import save_file

    from ..checkpoint import write_dir_atomic

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return write_dir_atomic(Path(directory), {
        TENSORS: lambda path: save_file(cpu, str(path)),
        META: json.dumps(meta, indent=2, sort_keys=True).encode()})


def save_reward_model(directory: str | Path, model: RewardModel, meta: dict) -> Path:
    """Save what `meta` says trains (LoRA factors or top blocks, and the head) with `meta` (the base's
    identity and hash, the trainable setting, the template; see the module docstring)."""
    state = model.state_dict()
    return write_reward_model(directory, meta, {k: state[k] for k in trainable_keys(state, meta)})


def resolve_reward_model(path: str | Path) -> tuple[Path, Path]:
    """(reward_model.json, tensors file) of an RM directory, a `gemmalab train rm` run (its final/,
    else its latest checkpoint) or one of its checkpoints (checkpoints/step-N)."""
    from .. import checkpoint as ckpt

    p = Path(path)
    if (p / META).is_file() and (p / TENSORS).is_file():
        return p / META, p / TENSORS
    if (p / "final" / META).is_file() and (p / "final" / TENSORS).is_file():
        return p / "final" / META, p / "final" / TENSORS
    if (p / META).is_file() and ckpt.latest(p) is not None:
        return p / META, ckpt.latest(p) / "model.safetensors"
    if (p / "model.safetensors").is_file() and (p.parent.parent / META).is_file():
        return p.parent.parent / META, p / "model.safetensors"
    if not p.exists():
        raise ValueError(f"{p}: no such reward model (a `gemmalab train rm` run directory, its final/ "
                         "or a checkpoint)")
    raise ValueError(f"{p} is not a reward model: expected {META} + {TENSORS}, a `gemmalab train rm` "
                     "run directory, or one of its checkpoints/step-N")


def read_reward_model(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, trainable tensors) of a reward model, without building it (what a merge needs)."""
    from safetensors.torch import load_file

    meta_path, tensors_path = resolve_reward_model(path)
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise ValueError(f"{meta_path}: not a JSON reward-model record ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a gemmalab reward model (format {meta.get('format')!r})")
    tensors = load_file(str(tensors_path))
    want = trainable_keys(tensors, meta)
    if "head.weight" not in tensors:
        raise ValueError(f"{tensors_path} holds no reward head (head.weight)")
    return meta, {k: tensors[k] for k in want}


def _rebuild_base(meta: dict, device: torch.device):
    """The backbone of `meta` with its adapters (if any) at their init, and its tokenizer; built by
    train.build exactly as `train rm` built it (a preset: the same seed, the same init)."""
    from ..build import build_model_and_tokenizer

    src = meta["base"]["source"]
    lora = meta.get("lora") or {}
    cfg = SimpleNamespace(
        model=SimpleNamespace(path=src.get("path") if not src.get("preset") else None,
                              preset=src.get("preset"), tokenizer=src.get("tokenizer"),
                              arch=src.get("arch") or {}, dtype="float32", activation_checkpointing=False),
        run=SimpleNamespace(seed=int(src.get("init_seed", 0))),
        lora=SimpleNamespace(rank=int(lora.get("rank", 0)) if meta["trainable"] == "lora" else 0,
                             alpha=float(lora.get("alpha", 16.0)), targets=list(lora.get("targets", []))))
    if cfg.model.path is not None and cfg.model.path.startswith("embedded:"):
        cfg.model.path = None
    with torch.random.fork_rng(devices=[]):  # a preset's init must not reseed the caller's RNG
        model, tokenizer = build_model_and_tokenizer(cfg, device)
    return model, tokenizer


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedRewardModel:
    """(model, tokenizer, meta) of a saved reward model, in eval mode without gradients. The base is
    rebuilt from the record and must hash to the recorded `base_hash`."""
    from ..lora import lora_modules

    device = torch.device(device)
    meta, tensors = read_reward_model(path)
    backbone, tokenizer = _rebuild_base(meta, device)
    src = meta["base"]["source"]
    _, digest = base_identity(backbone.config, path=src.get("path"), preset=src.get("preset"),
                              arch=src.get("arch"), init_seed=src.get("init_seed"),
                              tokenizer=src.get("tokenizer"))
    if digest != meta["base_hash"]:
        raise ValueError(f"{path}: the base model rebuilt from its record ({src}) is not the one it was "
                         f"trained on (base hash {digest[:12]}, recorded {meta['base_hash'][:12]})")
    if meta["trainable"] == "lora":
        for m in lora_modules(backbone).values():
            m.scale = float(meta["lora"]["scale"])
    model = RewardModel(backbone, RewardHead(backbone.config.hidden_size)).to(device)
    own = model.state_dict()
    missing = sorted(set(trainable_keys(own, meta)) - set(tensors))
    if missing:
        raise ValueError(f"{path} lacks trained tensors {missing[:3]} (a {meta['trainable']} reward model "
                         "saves them all)")
    for k, t in tensors.items():
        if k not in own or own[k].shape != t.shape:
            raise ValueError(f"{path}: {k} {tuple(t.shape)} does not fit the rebuilt model "
                             f"({tuple(own[k].shape) if k in own else 'no such tensor'})")
    model.load_state_dict(tensors, strict=False)
    model.eval().requires_grad_(False)
    return LoadedRewardModel(model, tokenizer, meta)


# ---------------------------------------------------------------------------------------------------
# WARM: the weight average of reward models

def average_reward_models(paths: Sequence[str | Path], weights: Sequence[float] | None = None
                          ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of the weighted average of M reward models (WARM, Rame et al. 2024): members
    with LoRA adapters are merged on their updates B A into one adapter of concatenated rank
    (train.averaging.merge_lora_deltas, exact), heads and top blocks are averaged tensor by tensor.
    Members must share the base (hash), the trainable setting, the template and every tensor's
    name and shape; weights are normalised to sum to 1 (default uniform)."""
    from ..averaging import MergeError, _weights, average, check_mergeable, merge_lora_deltas

    members = [read_reward_model(p) for p in paths]
    names = [str(p) for p in paths]
    c = _weights(len(members), weights)
    first = members[0][0]
    for name, (meta, _) in zip(names[1:], members[1:]):
        for key in ("trainable", "template"):
            if meta.get(key) != first.get(key):
                raise MergeError(f"{name} has {key} {meta.get(key)!r}, {names[0]} {first.get(key)!r}: "
                                 "members must be reward models of one kind")
    bases = [m["base_hash"] for m, _ in members]
    tensors = [t for _, t in members]
    meta = json.loads(json.dumps(first))
    if first["trainable"] == "lora":
        lora_sds = [{k: v for k, v in t.items() if ".lora_" in k} for t in tensors]
        rest = [{k: v for k, v in t.items() if ".lora_" not in k} for t in tensors]
        check_mergeable(tensors, bases, names)  # every tensor, the head included
        merged, scale = merge_lora_deltas(lora_sds, c, scales=[m["lora"]["scale"] for m, _ in members],
                                          bases=bases, names=names)
        out = {**merged, **average(rest, c, bases=bases, names=names)}
        rank = next(v for k, v in merged.items() if k.endswith(".lora_a")).shape[0]
        meta["lora"] = dict(first["lora"], rank=rank, scale=scale, alpha=scale * rank)
    else:
        out = average(tensors, c, bases=bases, names=names)
    meta["members"] = [{"path": n, "weight": ci, "base_hash": b} for n, ci, b in zip(names, c, bases)]
    meta["merge"] = "average"
    return meta, out


# ---------------------------------------------------------------------------------------------------
# As a reward term

class RewardModelTerm:
    """A reward model as a Reward (rewards.base): value = the score of prompt + completion, status
    "ok"; an input the tokenizer cannot take is status "error" (value None), never an exception.
    Scored in batches of `batch_size` under no_grad; `path` is anything `load_reward_model` takes,
    or an already loaded (model, tokenizer, meta)."""

    def __init__(self, path, name: str = "rm", batch_size: int = 16, device: str | torch.device = "cpu"):
        loaded = path if isinstance(path, LoadedRewardModel) else load_reward_model(path, device)
        self.model, self.tokenizer, self.meta = loaded
        self.name, self.batch_size = name, batch_size
        self.template, self.seq_len = self.meta["template"], int(self.meta["seq_len"])

    def __call__(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[RewardResult]:
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        results: list[RewardResult | None] = [None] * len(problems)
        seqs, where = [], []
        for i, (p, c) in enumerate(zip(problems, completions)):
            try:
                seqs.append(encode(self.tokenizer, p.prompt, c, self.template, self.seq_len))
                where.append(i)
            except (ValueError, TypeError) as e:  # DataError is a ValueError
                results[i] = failed("error", f"cannot tokenize: {e}")
        if seqs:
            scores = score_sequences(self.model, seqs, self.tokenizer.pad_id, self.batch_size)
            for i, s in zip(where, scores.tolist()):
                results[i] = RewardResult(float(s), "ok", {self.name: float(s)})
        return results
