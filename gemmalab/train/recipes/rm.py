"""A Bradley-Terry reward model, end to end: `gemmalab train rm CONFIG`.

    pairs      JSONL, one {"prompt", "chosen", "rejected"} object per line (strings; optional
               "margin": a number, "flipped": a bool marking a label corrupted on purpose)
    rows       rm.template = "chat": <bos> user turn, generation prompt, completion, <end_of_turn>
               (train.data.split_prompt: what the policy samples); "text": <bos> prompt+completion
               <eos> (train.data.tokenize_record); the score is read at that last token
    model      the Gemma 3 backbone + a scalar head (rewards.model.RewardModel); what trains:
               rm.trainable = "lora" (adapters on lora.targets), "top_blocks" (the top rm.top_blocks
               blocks and the final norm, the rest frozen) or "head" (linear probing)
    loss       Bradley & Terry (1952): -log sigmoid(r_c - r_r [- margin]) + center_coef (r_c + r_r)^2,
               TRL RewardTrainer's loss with its `center_rewards_coefficient` (train.losses.bt_loss)
    eval       every rm.eval_every steps and at the end, on data.eval: eval_loss, eval_accuracy and
               eval_ece (10-bin expected calibration error of sigmoid(r_c - r_r))

Seeds. WARM (Rame et al. 2024) averages members fine-tuned from a SHARED initialisation: linear mode
connectivity, and so weight averaging, fails without it. `rm.init_seed` is that shared init: the
random weights of a preset base, the LoRA A matrices (B = 0: every member starts at the base) and
the head (or the head of `rm.init_head`, e.g. a linear probe: trainable = "head"). `run.seed` only
orders the data. Members differing in run.seed, optim.lr, ... but not rm.init_seed are mergeable
with `gemmalab merge average`.

Normalisation: the loss of a step is the mean over its pairs (the trainer's weight of a micro-batch is
its number of pairs, so the logged `tokens` and `tokens_per_s` count pairs); `accuracy` and
`reward_margin` (mean r_c - r_r) are logged per step.

The run writes reward_model.json (the base's identity and hash, what trains) at the start, the
usual checkpoints (exact resume: all state is the trainable tensors, the optimizer and the data
position), and final/ (an RM directory: `gemmalab reward score`, `rewards.model.RewardModelTerm`).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch

from ..config import ConfigError, LoraConfig, ModelConfig, OptimConfig, RunConfig, _one_of
from ..data import DataError, resolve_files

__all__ = ["RMDataConfig", "RMSection", "RMConfig", "check_rm_config", "train_rm", "read_pairs",
           "PairDataset", "rm_loss", "build_reward_model", "reward_model_meta"]


@dataclass
class RMDataConfig:
    train: list[str] = field(default_factory=list)  # pair files: JSONL / JSONL.gz, directories or globs
    eval: list[str] = field(default_factory=list)  # held-out pairs (eval_loss / eval_accuracy / eval_ece)
    seq_len: int = 512  # tokens per row; longer prompts lose their start (the completion is kept)
    batch_size: int = 8  # pairs per micro-batch (2 rows each)


@dataclass
class RMSection:
    """See the module docstring. Names follow TRL's RewardConfig where it has one."""
    trainable: str = "lora"  # "lora" (the [lora] section), "top_blocks", "head" (linear probing)
    top_blocks: int = 2  # trainable = "top_blocks": the top N blocks + the final norm (+ the head)
    template: str = "chat"  # "chat" (user turn + model turn) or "text" (prompt + completion as is)
    center_coef: float = 0.0  # TRL's center_rewards_coefficient: + c (r_c + r_r)^2 per pair
    use_margin: bool = False  # subtract each pair's "margin" field (0 where missing) from r_c - r_r
    init_seed: int = 0  # the SHARED init of WARM members: preset weights, LoRA A, the head
    head_std: float = 0.02  # Normal(0, head_std) head init (transformers' initializer_range)
    init_head: str | None = None  # an RM (directory or run) whose head starts this one, e.g. a probe
    eval_every: int = 0  # evaluate on data.eval every N steps (and at the end); 0 = at the end only
    eval_batch_size: int = 16  # pairs per evaluation forward
    eval_max_pairs: int = 0  # evaluate on the first N held-out pairs; 0 = all


@dataclass
class RMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: RMDataConfig = field(default_factory=RMDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-5, warmup_steps=10))
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(rank=16))  # used by trainable = "lora"
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/rm", steps=300, save_every=50))
    rm: RMSection = field(default_factory=RMSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_files(name: str, paths: list[str]) -> None:
    try:
        files = resolve_files(paths)
    except DataError as e:
        raise ConfigError(f"{name}: {e}") from None
    bad = [str(f) for f in files if not f.name.endswith((".jsonl", ".jsonl.gz"))]
    if bad:
        raise ConfigError(f"{name}: preference pairs are JSONL (one {{prompt, chosen, rejected}} object "
                          f"per line), not {bad[0]}")


def check_rm_config(cfg: RMConfig) -> RMConfig:
    """Refuse what cannot run, before any model is built or step taken."""
    r, d = cfg.rm, cfg.data
    _one_of("rm.trainable", r.trainable, ("lora", "top_blocks", "head"))
    _one_of("rm.template", r.template, ("chat", "text"))
    if r.trainable == "lora" and cfg.lora.rank < 1:
        raise ConfigError("rm.trainable = 'lora' trains LoRA adapters: set lora.rank >= 1 (or "
                          "rm.trainable = 'top_blocks' / 'head')")
    if r.top_blocks < 1:
        raise ConfigError(f"rm.top_blocks must be >= 1, got {r.top_blocks}")
    if r.center_coef < 0:
        raise ConfigError(f"rm.center_coef must be >= 0, got {r.center_coef}")
    if not r.head_std >= 0:
        raise ConfigError(f"rm.head_std must be >= 0, got {r.head_std}")
    if r.eval_every < 0 or r.eval_batch_size < 1 or r.eval_max_pairs < 0:
        raise ConfigError("rm.eval_every and rm.eval_max_pairs must be >= 0, rm.eval_batch_size >= 1")
    if d.seq_len < 4 or d.batch_size < 1:
        raise ConfigError(f"data.seq_len must be >= 4 and data.batch_size >= 1, got {d.seq_len}, "
                          f"{d.batch_size}")
    if not d.train:
        raise ConfigError("data.train lists no preference-pair files (JSONL {prompt, chosen, rejected})")
    _check_files("data.train", d.train)
    if d.eval:
        _check_files("data.eval", d.eval)
    elif r.eval_every:
        raise ConfigError("rm.eval_every evaluates on held-out pairs: list them in data.eval")
    if cfg.model.preset and not cfg.model.tokenizer:
        raise ConfigError("a preset model needs model.tokenizer (a GGUF file or HF directory)")
    if r.init_head is not None:
        from ..rewards.model import resolve_reward_model
        try:
            resolve_reward_model(r.init_head)
        except ValueError as e:
            raise ConfigError(f"rm.init_head: {e}") from None
    return cfg


# ---------------------------------------------------------------------------------------------------
# Pairs

def _lines(path: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    yield i, line
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None


def read_records(paths) -> list[tuple[str, dict]]:
    """(where, object) for every non-blank JSONL line of the files (file:line for errors)."""
    out = []
    for path in resolve_files(paths):
        for i, line in _lines(path):
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{i}: invalid JSON: {e}") from None
            if not isinstance(obj, Mapping):
                raise DataError(f"{path}:{i}: a record is a JSON object, not {type(obj).__name__}")
            out.append((f"{path}:{i}", dict(obj)))
    return out


def read_pairs(paths) -> list[dict]:
    """Preference pairs {prompt, chosen, rejected, margin (0.0 if absent), flipped (False)}, in
    file order; one DataError naming the file and line for a malformed one."""
    pairs = []
    for where, obj in read_records(paths):
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(obj.get(key), str):
                raise DataError(f"{where}: a preference pair needs a string {key!r} (keys: "
                                f"{', '.join(map(repr, list(obj)[:8])) or 'none'})")
        margin, flipped = obj.get("margin", 0.0), obj.get("flipped", False)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise DataError(f"{where}: 'margin' must be a number, not {margin!r}")
        if not isinstance(flipped, bool):
            raise DataError(f"{where}: 'flipped' must be true or false, not {flipped!r}")
        pairs.append({"prompt": obj["prompt"], "chosen": obj["chosen"], "rejected": obj["rejected"],
                      "margin": float(margin), "flipped": flipped, "where": where})
    if not pairs:
        raise DataError(f"no preference pair in {', '.join(map(str, paths))}")
    return pairs


def encode_pairs(pairs: list[dict], tokenizer, template: str, seq_len: int) -> list[tuple]:
    """(chosen ids, rejected ids, margin, flipped) per pair (rewards.model.encode)."""
    from ..rewards.model import encode

    out = []
    for p in pairs:
        try:
            out.append((encode(tokenizer, p["prompt"], p["chosen"], template, seq_len),
                        encode(tokenizer, p["prompt"], p["rejected"], template, seq_len),
                        p["margin"], p["flipped"]))
        except DataError as e:
            raise DataError(f"{p['where']}: {e}") from None
    return out


class PairDataset:
    """Micro-batches of `batch_size` encoded pairs, epoch after epoch, resumable exactly.

    Epoch e visits the pairs in the order of random.Random(seed + e); a last partial batch of an
    epoch is dropped. A batch: input_ids, positions, segment_ids (B, 2, T) with row 0 the chosen and
    row 1 the rejected completion, padded at the end to the batch's longest; last_index (B, 2),
    margin (B,), flipped (B,).
    """

    def __init__(self, encoded: list[tuple], batch_size: int, seed: int, pad_id: int):
        if len(encoded) < batch_size:
            raise DataError(f"{len(encoded)} preference pairs, fewer than data.batch_size = {batch_size}")
        self.encoded, self.batch_size, self.seed, self.pad_id = encoded, batch_size, seed, pad_id
        self._epoch, self._index, self._batches = 0, 0, 0

    def batch(self, items: list[tuple]) -> dict[str, torch.Tensor]:
        from ..rewards.model import rows_batch

        B = len(items)
        rows = rows_batch([seq for c, r, _, _ in items for seq in (c, r)], self.pad_id)
        out = {k: v.view(B, 2, *v.shape[1:]) for k, v in rows.items()}
        out["margin"] = torch.tensor([m for _, _, m, _ in items], dtype=torch.float32)
        out["flipped"] = torch.tensor([f for _, _, _, f in items], dtype=torch.bool)
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        B, n = self.batch_size, len(self.encoded)
        while True:
            order = list(range(n))
            random.Random(self.seed + self._epoch).shuffle(order)
            while (self._index + 1) * B <= n:
                idx = order[self._index * B:(self._index + 1) * B]
                self._index += 1
                self._batches += 1
                yield self.batch([self.encoded[i] for i in idx])
            self._epoch, self._index = self._epoch + 1, 0

    def state_dict(self) -> dict:
        return {"version": 1, "kind": "pairs", "pairs": len(self.encoded), "seed": self.seed,
                "batch_size": self.batch_size, "epoch": self._epoch, "index": self._index,
                "batches": self._batches}

    def load_state_dict(self, state: Mapping) -> None:
        mine = {"kind": "pairs", "pairs": len(self.encoded), "seed": self.seed, "batch_size": self.batch_size}
        diff = [k for k in mine if state.get(k) != mine[k]]
        if state.get("version") != 1 or diff:
            raise ValueError("the saved data state belongs to another pair stream ("
                             + ", ".join(diff or ["version"]) + " differ); resume with the same pair "
                             "files, run.seed and data.batch_size, or start afresh")
        self._epoch, self._index, self._batches = state["epoch"], state["index"], state["batches"]


# ---------------------------------------------------------------------------------------------------
# The model

def reward_model_meta(cfg: RMConfig, config) -> dict:
    """What reward_model.json records for this run (see rewards.model)."""
    from ..rewards.model import FORMAT, base_identity

    m, r = cfg.model, cfg.rm
    record, digest = base_identity(config, path=m.path, preset=m.preset, arch=m.arch, init_seed=r.init_seed,
                                   tokenizer=m.tokenizer)
    meta = {"format": FORMAT, "version": 1, "base": record, "base_hash": digest, "trainable": r.trainable,
            "template": r.template, "seq_len": cfg.data.seq_len, "init_seed": r.init_seed}
    if r.trainable == "lora":
        meta["lora"] = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
                        "scale": cfg.lora.alpha / cfg.lora.rank, "targets": list(cfg.lora.targets)}
    if r.trainable == "top_blocks":
        meta["top_blocks"] = r.top_blocks
    return meta


def build_reward_model(cfg: RMConfig, device: torch.device):
    """(RewardModel, tokenizer, meta) at the shared init of rm.init_seed (see the module docstring)."""
    from ..build import build_model_and_tokenizer
    from ..lora import lora_modules
    from ..rewards.model import RewardHead, RewardModel, read_reward_model

    r = cfg.rm
    # the base (a preset's random weights) from init_seed, not run.seed; LoRA only if it trains
    build_cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, seed=r.init_seed),
        lora=dataclasses.replace(cfg.lora, rank=cfg.lora.rank if r.trainable == "lora" else 0))
    with torch.random.fork_rng(devices=[]):
        backbone, tokenizer = build_model_and_tokenizer(build_cfg, device)
    backbone.requires_grad_(False)
    n = backbone.config.num_hidden_layers
    if r.trainable == "lora":
        g = torch.Generator().manual_seed(r.init_seed)
        with torch.no_grad():
            for _, mod in sorted(lora_modules(backbone).items()):  # A: LoRALinear's init, seeded; B = 0
                a = torch.empty(mod.lora_a.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(a, a=5 ** 0.5, generator=g)
                mod.lora_a.copy_(a)
                mod.lora_b.zero_()
                mod.lora_a.requires_grad_(True)
                mod.lora_b.requires_grad_(True)
    elif r.trainable == "top_blocks":
        if r.top_blocks > n:
            raise ConfigError(f"rm.top_blocks = {r.top_blocks}, but the model has {n} blocks")
        for layer in backbone.layers[n - r.top_blocks:]:
            layer.requires_grad_(True)
        backbone.norm.requires_grad_(True)
    head = RewardHead(backbone.config.hidden_size)
    head.reset(r.init_seed, r.head_std)
    meta = reward_model_meta(cfg, backbone.config)
    if r.init_head is not None:
        probe, tensors = read_reward_model(r.init_head)
        if probe["base_hash"] != meta["base_hash"]:
            raise ConfigError(f"rm.init_head {r.init_head} was trained on another base than this run's")
        with torch.no_grad():
            head.weight.copy_(tensors["head.weight"])
    model = RewardModel(backbone, head.to(device))
    model.train()
    return model, tokenizer, meta


def _scores(model, batch: dict) -> torch.Tensor:
    """(B, 2) scores of a pair batch: chosen, rejected."""
    ids = batch["input_ids"]
    B, _, T = ids.shape
    r = model.scores(ids.reshape(2 * B, T), batch["positions"].reshape(2 * B, T),
                     batch["segment_ids"].reshape(2 * B, T), batch["last_index"].reshape(2 * B))
    return r.view(B, 2)


def rm_loss(model, batch: dict, normalizer: float, cfg: RMConfig) -> tuple[torch.Tensor, dict]:
    """The summed Bradley-Terry loss of a micro-batch / normalizer (the step's pairs), and metrics
    (accuracy, reward_margin: means over the step's pairs)."""
    from ..losses import bt_loss

    r = _scores(model, batch)
    margin = batch["margin"] if cfg.rm.use_margin else None
    loss = bt_loss(r[:, 0], r[:, 1], margin, cfg.rm.center_coef, reduction="sum") / normalizer
    diff = (r[:, 0] - r[:, 1]).detach()
    correct = (diff > 0).double() + 0.5 * (diff == 0).double()
    return loss, {"accuracy": correct.sum() / normalizer, "reward_margin": diff.double().sum() / normalizer}


def _evaluate(encoded: list[tuple], tokenizer, batch_size: int):
    from ..losses import preference_metrics
    from ..rewards.model import score_sequences

    def evaluate(model) -> dict:
        seqs = [s for c, r, _, _ in encoded for s in (c, r)]
        s = score_sequences(model, seqs, tokenizer.pad_id, 2 * batch_size).view(-1, 2)
        flipped = torch.tensor([f for *_, f in encoded])
        m = preference_metrics(s[:, 0], s[:, 1], flipped)
        return {f"eval_{k}": v for k, v in m.items() if k != "pairs"}
    return evaluate


EVAL_FIELDS = ("eval_loss", "eval_accuracy", "eval_ece", "eval_margin")


def train_rm(cfg: RMConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a reward-model job; return the last logged metrics. final/ holds the model."""
    from .. import checkpoint as ckpt
    from ..rewards.model import META, save_reward_model
    from ..trainer import setup_run, train_loop

    r = cfg.rm
    rank, world, device = setup_run(cfg)
    model, tokenizer, meta = build_reward_model(cfg, device)
    train = encode_pairs(read_pairs(cfg.data.train), tokenizer, r.template, cfg.data.seq_len)
    held = (encode_pairs(read_pairs(cfg.data.eval), tokenizer, r.template, cfg.data.seq_len)
            if cfg.data.eval else [])
    if r.eval_max_pairs:
        held = held[:r.eval_max_pairs]
    data = PairDataset(train, cfg.data.batch_size, cfg.run.seed, tokenizer.pad_id)
    out = Path(cfg.run.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_atomic(out / META, json.dumps(meta, indent=2, sort_keys=True).encode())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        what = {"lora": f"LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}",
                "top_blocks": f"the top {r.top_blocks} blocks + final norm",
                "head": "the head only (linear probing)"}[r.trainable]
        print(f"gemmalab train rm: {what} + head ({n_train:,} trainable parameters); {r.template} "
              f"template; {len(train)} pairs" + (f", {len(held)} held out" if held else "")
              + f"; shared init seed {r.init_seed} (rm.init_seed), data order seed {cfg.run.seed}"
              + (f"; center_coef {r.center_coef}" if r.center_coef else "")
              + ("; margins from the data" if r.use_margin else ""), file=sys.stderr, flush=True)
    fields = ("accuracy", "reward_margin") + (EVAL_FIELDS if held else ())
    if held and any(f for *_, f in held):
        fields += ("eval_accuracy_flipped", "eval_accuracy_clean")
    last = train_loop(cfg, model, data, lambda m, b, n: rm_loss(m, b, n, cfg), rank=rank, world=world,
                      device=device, resume=resume, progress=progress,
                      weight=lambda b: float(b["input_ids"].shape[0]),
                      evaluate=_evaluate(held, tokenizer, r.eval_batch_size) if held else None,
                      eval_every=r.eval_every, extra_fields=fields)
    if rank == 0:
        save_reward_model(out / "final", model, meta)
    return last
