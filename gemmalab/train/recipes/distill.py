"""Pre-training distillation, end to end: `gemmalab train distill CONFIG`.

    student (a preset + arch overrides, or a checkpoint)  <-  targets  <-  teacher
                                                              offline: a teacher-logit store
                                                              online:  the teacher in the loop

Readable top to bottom; it is the shared loop (`train.trainer.train_loop`: AdamW, accumulation, DDP,
checkpoints, exact resume, metrics) with another data source and loss:

* offline (distill.mode = "offline"): batches come from a store built by `gemmalab distill cache`
  (`train.logit_store.StoreDataset`); no teacher in memory. loss = "sampled" uses the stored ids and
  probabilities (Gemma 3: renormalised over the sampled set, or importance weights counts / K);
  "topk" uses a top-k store, or the top k of a store with full log-probabilities; "full" needs full
  log-probabilities (a reference: 512 KiB per token); "ce" trains on the stored rows' next tokens.
* online (distill.mode = "online"): batches come from data.train (`train.data.PackedDataset`, as in
  SFT); each micro-batch first goes through the teacher (no gradients), which samples the same
  targets the store would hold (`train.teacher.teacher_targets`), or hands its hidden states to the
  full-vocabulary loss. Sampling is seeded by (run.seed, step, micro-batch, rank): a resumed run draws
  what an uninterrupted one would.

The losses are `train.losses` (one chunked-vocabulary engine). Evaluation (eval.store, every
eval.every steps) logs eval_ce (held-out next-token cross-entropy, nats) and, when the held-out store
has full log-probabilities, eval_kl = KL(teacher || student) per token.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..build import build_model_and_tokenizer, load_frozen
from ..config import DistillConfig
from ..logit_store import LogitStore, StoreDataset, StoreError, resolve_teacher
from ..losses import (chunked_cross_entropy, full_kd_loss, kd_metrics, sparse_kd_loss,
                      sparse_target_weights)
from ..teacher import head_logits, teacher_targets, topk_targets
from ..trainer import setup_run, train_loop

__all__ = ["train_distill", "distill_loss", "evaluate_on_store"]


def train_distill(cfg: DistillConfig, resume: bool = False, progress: bool = True,
                  student_hook=None) -> dict:
    """Run (or resume) a distillation job; return the last logged metrics.

    student_hook(model): called on the freshly built student before the optimizer sees it, e.g.
    `gemmalab train qat` attaching fake quantization (train.recipes.qat)."""
    d = cfg.distill
    rank, world, device = setup_run(cfg)
    teacher, tokenizer = None, None
    store = LogitStore(d.store) if d.mode == "offline" else None
    if d.mode == "online":
        teacher, tokenizer = load_frozen(resolve_teacher(d.teacher), device)
    elif cfg.model.preset and not cfg.model.tokenizer:  # the student speaks the teacher's vocabulary
        tokenizer = tokenizer_of(d.teacher or store.teacher_path)
    model, tokenizer = build_model_and_tokenizer(cfg, device, tokenizer)
    if student_hook is not None:
        student_hook(model)
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the teacher has {teacher.config.vocab_size} vocabulary entries, the student "
                         f"{model.config.vocab_size}: distillation needs the same vocabulary")

    if d.mode == "offline":
        store.check_tokenizer(tokenizer)
        if d.teacher:
            store.check_teacher(d.teacher)
        _check_store_supports(store, cfg)
        data = StoreDataset(store, cfg.data.batch_size, seed=cfg.run.seed)
        prepare = _offline_prepare(cfg) if d.loss == "topk" and store.sampling != "topk" else None
    else:
        from ..data import PackedDataset
        data = PackedDataset(cfg.data.train, tokenizer, cfg.data.seq_len, cfg.data.batch_size,
                             seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                             train_on=cfg.data.train_on)
        prepare = _online_prepare(cfg, teacher, rank)

    evaluate, fields = None, ()
    if cfg.eval.store:
        eval_store = LogitStore(cfg.eval.store)
        eval_store.check_tokenizer(tokenizer)
        fields = ("eval_ce", "eval_kl") if eval_store.has_logprobs else ("eval_ce",)

        def evaluate(m):
            return evaluate_on_store(m, eval_store, max_rows=cfg.eval.max_rows,
                                     batch_size=cfg.eval.batch_size)

    def loss_fn(m, batch, normalizer):
        return distill_loss(m, batch, normalizer, cfg, teacher)

    return train_loop(cfg, model, data, loss_fn, rank=rank, world=world, device=device, resume=resume,
                      progress=progress, prepare=prepare, evaluate=evaluate, eval_every=cfg.eval.every,
                      extra_fields=fields)


def distill_loss(model, batch: dict, normalizer: float, cfg: DistillConfig, teacher=None) -> torch.Tensor:
    """The loss of one micro-batch; batch holds the packed rows and the teacher's targets."""
    d = cfg.distill
    h = model.hidden_states(batch["input_ids"], batch["positions"], segment_ids=batch["segment_ids"])
    w, cap, targets = model.embed_tokens.weight, model.config.final_logit_softcapping, batch["targets"]
    if d.loss == "ce":
        return chunked_cross_entropy(h, w, targets, softcap=cap, normalizer=normalizer)
    if d.loss == "full":
        if "teacher_logprobs" in batch:  # a store's log-probabilities, already at its temperature
            tl, tau = batch["teacher_logprobs"], 1.0
        else:
            tl = head_logits(batch["teacher_hidden"], teacher.embed_tokens.weight,
                             teacher.config.final_logit_softcapping)
            tau = d.temperature
        return full_kd_loss(h, w, targets, tl, temperature=tau, hard_weight=d.hard_weight,
                            softcap=cap, normalizer=normalizer)
    weights = sparse_target_weights(batch["teacher_probs"], batch.get("teacher_counts"),
                                    weighting=d.weighting)
    return sparse_kd_loss(h, w, targets, batch["teacher_ids"], weights, normalizer_over=d.normalizer,
                          hard_weight=d.hard_weight, softcap=cap, normalizer=normalizer)


def _check_store_supports(store: LogitStore, cfg: DistillConfig) -> None:
    d = cfg.distill
    if d.loss == "full" and not store.has_logprobs:
        raise StoreError(f"distill.loss = 'full' needs the teacher's full distribution, and {store.path} "
                         "keeps sparse targets only: rebuild it with --full-logprobs, or train online "
                         "(distill.mode = 'online')")
    if d.loss == "sampled" and store.sampling == "topk":
        raise StoreError(f"{store.path} holds top-{store.k} targets, not samples: use distill.loss = 'topk'")
    if d.loss == "topk" and store.sampling != "topk" and not store.has_logprobs:
        raise StoreError(f"{store.path} holds sampled targets; top-k KD needs a top-k store "
                         "(--sampling topk) or full log-probabilities (--full-logprobs)")
    if d.weighting == "importance" and d.loss == "sampled" and not store.has_counts:
        raise StoreError(f"distill.weighting = 'importance' needs draw counts, and {store.path} was "
                         f"sampled {store.sampling.replace('_', ' ')}: rebuild with --replacement")
    if d.loss == "topk" and d.k > store.k and store.sampling == "topk":
        raise StoreError(f"distill.k = {d.k} but {store.path} holds the top {store.k} only")
    if store.seq_len < 2 or cfg.data.batch_size < 1:
        raise StoreError(f"{store.path}: rows of {store.seq_len} tokens cannot be trained on")


def _offline_prepare(cfg: DistillConfig):
    """Top-k targets from a store's full log-probabilities, a token chunk at a time."""
    k = cfg.distill.k

    def prepare(model, batch, step, micro):
        lp = batch["teacher_logprobs"]
        B, T, V = lp.shape
        rows = (batch["targets"].reshape(-1) != -100).nonzero().squeeze(1)
        ids = torch.full((B * T, k), -1, dtype=torch.int64)
        probs = torch.zeros((B * T, k), dtype=torch.float32)
        flat = lp.reshape(B * T, V)
        for n0 in range(0, rows.numel(), 64):
            r = rows[n0:n0 + 64]
            ids[r], probs[r] = topk_targets(flat[r].float(), k)
        return dict(batch, teacher_ids=ids.view(B, T, k), teacher_probs=probs.view(B, T, k))
    return prepare


def _online_prepare(cfg: DistillConfig, teacher, rank: int):
    d = cfg.distill

    @torch.no_grad()
    def prepare(model, batch, step, micro):
        if d.loss == "ce":
            return batch
        hidden = teacher.hidden_states(batch["input_ids"], batch["positions"],
                                       segment_ids=batch["segment_ids"])
        if d.loss == "full":
            return dict(batch, teacher_hidden=hidden)
        gen = torch.Generator().manual_seed(((cfg.run.seed * 1_000_003 + step) * 1_009 + micro) * 101 + rank)
        sampling = "topk" if d.loss == "topk" else d.sampling
        return dict(batch, **teacher_targets(teacher, batch, k=d.k, sampling=sampling,
                                             temperature=d.temperature, generator=gen, hidden=hidden))
    return prepare


@torch.no_grad()
def evaluate_on_store(model, store: LogitStore, *, max_rows: int = 0, batch_size: int = 4) -> dict:
    """Held-out metrics over the first `max_rows` rows (0: all) of a store, in nats per target token:
    eval_ce (next-token cross-entropy) and, with full log-probabilities, eval_kl (KL(teacher || student))."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    left = max_rows or store.num_rows
    try:
        for s, entry in enumerate(store.shards):
            for r0 in range(0, entry["rows"], batch_size):
                if left <= 0:
                    break
                r1 = min(entry["rows"], r0 + batch_size, r0 + left)
                left -= r1 - r0
                b = store.rows(s, r0, r1)
                dev = model.embed_tokens.weight.device
                h = model.hidden_states(b["input_ids"].to(dev), b["positions"].to(dev),
                                        segment_ids=b["segment_ids"].to(dev))
                m = kd_metrics(h, model.embed_tokens.weight, b["targets"].to(dev),
                               b.get("teacher_logprobs"), softcap=model.config.final_logit_softcapping)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
    finally:
        model.train(was_training)
    n = max(1.0, sums.get("tokens", 0.0))
    out = {"eval_ce": sums.get("ce", 0.0) / n}
    if "kl" in sums:
        out["eval_kl"] = sums["kl"] / n
    return out


def tokenizer_of(model_path: str | Path | None):
    """The tokenizer of a GGUF file or HF directory (None: the embedded 270M), without its weights."""
    from ...tokenizer import Tokenizer
    if model_path is None:
        raise StoreError("the student needs a tokenizer: set model.tokenizer or distill.teacher")
    p = resolve_teacher(model_path)
    return Tokenizer.from_hf_dir(p) if p.is_dir() else Tokenizer.from_gguf(p)


def load_student(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) of a finished run: the config.json's model section and the latest weights."""
    import json

    from safetensors.torch import load_file

    from .. import checkpoint as ckpt
    from ..config import build_config
    run_dir = Path(run_dir)
    raw = json.loads((run_dir / "config.json").read_text())
    cfg = build_config(raw, DistillConfig)
    tokenizer = None
    if not cfg.model.tokenizer and cfg.model.preset:
        source = cfg.distill.teacher
        if source is None and cfg.distill.mode == "offline":
            source = LogitStore(cfg.distill.store, verify=False).teacher_path
        tokenizer = tokenizer_of(source)
    model, tokenizer = build_model_and_tokenizer(cfg, torch.device(device), tokenizer)
    latest = ckpt.latest(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet")
    model.load_state_dict(load_file(str(latest / "model.safetensors")), strict=False)
    return model.eval().requires_grad_(False), tokenizer
