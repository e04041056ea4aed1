"""Supervised fine-tuning, end to end: model + data + chunked loss + AdamW + checkpoints + resume.

Readable top to bottom. The pieces it stands on are plain functions other recipes reuse:
`train.data` (packed batches), `train.losses` (chunked cross-entropy), `train.lora`,
`train.checkpoint` (atomic save / exact resume), and here `setup_run` (threads, torchrun, device)
and `train_loop` (the optimizer loop shared with `train.distill`).

Gradient accumulation: the loss of each micro-batch is divided by the number of target tokens of
the whole optimizer step (all micro-batches, all processes), so the accumulated gradient equals that
of one big batch however the tokens fall into micro-batches.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import get_config
from ..model import Gemma3
from . import checkpoint as ckpt
from .config import SFTConfig
from .data import IGNORE_INDEX, PackedDataset
from .lora import apply_lora
from .losses import chunked_cross_entropy


def build_model_and_tokenizer(cfg: SFTConfig, device: torch.device, tokenizer=None):
    """The model to train (fp32 master weights unless told otherwise) and its tokenizer.

    A preset model (random init) takes `model.arch` overrides of its Gemma3Config fields and its
    tokenizer from `model.tokenizer`, or from the `tokenizer` argument when that is not set.
    """
    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.arch and not cfg.model.preset:
        raise ValueError("model.arch overrides a preset's fields; set model.preset too")
    if cfg.model.preset:
        from ..tokenizer import Tokenizer
        if cfg.model.tokenizer:
            src = Path(cfg.model.tokenizer)
            tokenizer = Tokenizer.from_hf_dir(src) if src.is_dir() else Tokenizer.from_gguf(src)
        elif tokenizer is None:
            raise ValueError("a preset model needs model.tokenizer (a GGUF file or HF directory)")
        config = preset_config(cfg.model.preset, cfg.model.arch)
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the preset "
                             f"{config.name} only {config.vocab_size} embedding rows")
        torch.manual_seed(cfg.run.seed)
        model = Gemma3(config)
        init_weights(model)
        model = model.to(device=device, dtype=dtype)
    else:
        from ..lm import load
        lm = load(cfg.model.path, mode="fp32", dtype=dtype, device=device)
        model, tokenizer = lm.model, lm.tokenizer
    model.train().requires_grad_(True)
    model.activation_checkpointing = cfg.model.activation_checkpointing
    if cfg.lora.rank:
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    return model, tokenizer


def preset_config(preset: str, arch: dict | None = None):
    """A named preset with some Gemma3Config fields replaced (lists become tuples, e.g. layer_types)."""
    import dataclasses

    config = get_config(preset)
    if not arch:
        return config
    valid = {f.name for f in dataclasses.fields(config)}
    bad = sorted(set(arch) - valid)
    if bad:
        raise ValueError(f"model.arch: unknown Gemma3Config field(s) {bad}; valid: {sorted(valid)}")
    return config.replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()})


@torch.no_grad()
def init_weights(model: Gemma3, std: float = 0.02) -> None:
    """Normal(0, std) linears and embedding; norms at w = 0 (gain 1), as in transformers."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.zero_()
        else:
            p.normal_(0.0, std)


def lr_lambda(cfg: SFTConfig):
    warmup, total, floor = cfg.optim.warmup_steps, cfg.run.steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def make_optimizer(model: torch.nn.Module, cfg: SFTConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    try:  # the fused kernel is ~6x faster than the for-loop one on CPU (docs/training.md)
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # dtype/device combinations without a fused kernel
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class LossModule(torch.nn.Module):
    """The model with its loss as `forward`, the shape DistributedDataParallel wraps.

    Under autocast the blocks run in bf16 while the chunked loss computes in fp32 (it upcasts).
    """

    def __init__(self, model: Gemma3, autocast_dtype: torch.dtype | None = None, loss_fn=None):
        super().__init__()
        self.model, self.autocast_dtype = model, autocast_dtype
        self.loss_fn = loss_fn or micro_batch_loss  # a plain function: (model, batch, normalizer)

    def forward(self, batch: dict, normalizer: float) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self.loss_fn(self.model, batch, normalizer)
        device_type = batch["input_ids"].device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype):
            return self.loss_fn(self.model, batch, normalizer)


def autocast_dtype(cfg: SFTConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training (fp32 master weights either way), or None for plain fp32.

    model.autocast = "auto": bf16 on CUDA; on CPU bf16 where `gemmalab.cpu.cpu_bf16()` says so (the
    CPU has native bf16 dot products, AVX512_BF16 or AMX-BF16; GEMMALAB_CPU_BF16=0|1 overrides),
    fp32 elsewhere. "bfloat16" and "none" force the choice.
    """
    return autocast_choice(cfg, device)[0]


def autocast_choice(cfg: SFTConfig, device: torch.device) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None, the one line the run logs about it)."""
    from .. import cpu

    choice = cfg.model.autocast
    if choice not in ("auto", "bfloat16", "none"):
        raise ValueError(f"model.autocast must be 'auto', 'bfloat16' or 'none', got {choice!r}")
    if choice == "none":
        return None, "autocast: none (fp32; model.autocast='none')"
    if choice == "bfloat16":
        slow = ("; this CPU has no native bf16 (AVX512_BF16 / AMX-BF16), so bf16 may be slower than fp32"
                if device.type == "cpu" and not cpu.native_bf16() else "")
        return torch.bfloat16, f"autocast: bf16 (model.autocast='bfloat16'{slow})"
    if device.type == "cuda":
        return torch.bfloat16, "autocast: bf16 (CUDA; model.autocast='none' for fp32)"
    if device.type != "cpu":
        return None, f"autocast: none (fp32 on {device.type}; model.autocast='bfloat16' to force bf16)"
    forced = os.environ.get("GEMMALAB_CPU_BF16", "").strip()
    if cpu.cpu_bf16():
        why = (f"GEMMALAB_CPU_BF16={forced}" if forced else
               "CPU has " + ("AVX512_BF16" if cpu.has("avx512_bf16") else "AMX-BF16"))
        return torch.bfloat16, (f"autocast: bf16 ({why}; GEMMALAB_CPU_BF16=0 or model.autocast='none' "
                                "for fp32)")
    if forced:
        why = f"GEMMALAB_CPU_BF16={forced}"
    elif cpu.native_bf16():
        why = f"torch's CPU capability is {torch.backends.cpu.get_cpu_capability()}, below AVX512"
    else:
        why = "this CPU has no native bf16 (AVX512_BF16 / AMX-BF16)"
    return None, f"autocast: none (fp32: {why}; model.autocast='bfloat16' to force bf16)"


def setup_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def micro_batch_loss(model: Gemma3, batch: dict, normalizer: float) -> torch.Tensor:
    h = model.hidden_states(batch["input_ids"], batch["positions"],
                            segment_ids=batch["segment_ids"])
    return chunked_cross_entropy(h, model.embed_tokens.weight, batch["targets"],
                                 softcap=model.config.final_logit_softcapping,
                                 normalizer=normalizer)


def setup_run(cfg) -> tuple[int, int, torch.device]:
    """Threads, the torchrun process group and the device: (rank, world size, device)."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    rank, world = setup_distributed()
    device = pick_device(cfg.run.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.data.batch_size % world:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} (sequences per micro-batch, all "
                         f"processes together) must be divisible by the {world} processes")
    return rank, world, device


def train_sft(cfg: SFTConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) an SFT job; return the last logged metrics."""
    rank, world, device = setup_run(cfg)
    model, tokenizer = build_model_and_tokenizer(cfg, device)
    data = PackedDataset(cfg.data.train, tokenizer, cfg.data.seq_len,
                         cfg.data.batch_size, seed=cfg.run.seed,
                         shuffle_buffer=cfg.data.shuffle_buffer, train_on=cfg.data.train_on)
    return train_loop(cfg, model, data, micro_batch_loss, rank=rank, world=world, device=device,
                      resume=resume, progress=progress)


def train_loop(cfg, model: Gemma3, data, loss_fn, *, rank: int, world: int, device: torch.device,
               resume: bool = False, progress: bool = True, prepare=None, evaluate=None,
               eval_every: int = 0, extra_fields: tuple[str, ...] = ()) -> dict:
    """The optimizer loop of every recipe; returns the last logged metrics.

    AdamW + warmup/cosine, `cfg.optim.grad_accum` micro-batches per step normalised by the global
    target-token count, DistributedDataParallel under torchrun, gradient clipping, metrics
    (JSONL/CSV/TensorBoard), atomic checkpoints every `cfg.run.save_every` steps and exact resume
    (`data` needs `state_dict` / `load_state_dict`).

    loss_fn(model, batch, normalizer) -> loss of one micro-batch (summed token losses / normalizer).
    prepare(batch, step, micro) -> batch: runs on this process's rows after sharding, e.g. to add
        teacher targets (online distillation); `step` is the optimizer step being computed.
    evaluate(model) -> dict of metrics, on rank 0 every `eval_every` steps and at the end; its keys
        (listed in `extra_fields` for the CSV) join that step's metrics row.
    """
    out = Path(cfg.run.out_dir)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    step, tokens_seen, state = 0, 0, {}
    if resume and ckpt.latest(out) is not None:
        state = ckpt.load(ckpt.latest(out), model, optimizer, scheduler, data)
        step, tokens_seen = state["step"], state["tokens_seen"]
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2).encode())
    metrics_log = (ckpt.MetricsLog(out / "metrics.jsonl", truncate_after=step,
                                   fields=ckpt.MetricsLog.FIELDS + tuple(extra_fields))
                   if rank == 0 else None)
    amp_dtype, amp_note = autocast_choice(cfg, device)
    amp_name = "none" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
    if rank == 0:
        print(f"gemmalab train: {amp_note}", file=sys.stderr, flush=True)
        if resume and state.get("autocast", amp_name) != amp_name:
            print(f"gemmalab train: note: the checkpoint was trained with autocast "
                  f"{state['autocast']}, this run continues with {amp_name}", file=sys.stderr, flush=True)
    step_module = LossModule(model, amp_dtype, loss_fn)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        step_module = DistributedDataParallel(step_module)

    batches = iter(data)
    bar = _progress(cfg.run.steps, step, progress and rank == 0)
    last: dict = {}
    t_last, tok_last = time.perf_counter(), tokens_seen
    while step < cfg.run.steps:
        micro = [_shard(next(batches), rank, world, device) for _ in range(cfg.optim.grad_accum)]
        if prepare is not None:
            micro = [prepare(b, step, i) for i, b in enumerate(micro)]
        n_targets = torch.tensor(float(sum(int((b["targets"] != IGNORE_INDEX).sum())
                                           for b in micro)), device=device)
        if world > 1:
            dist.all_reduce(n_targets)
        normalizer = max(1.0, n_targets.item()) / world  # DDP averages gradients over processes
        loss_sum = torch.zeros((), device=device)
        for i, b in enumerate(micro):
            sync = world == 1 or i == len(micro) - 1  # all-reduce gradients once per step
            with contextlib.nullcontext() if sync else step_module.no_sync():
                loss = step_module(b, normalizer)
                loss.backward()
            loss_sum += loss.detach() / world
        if world > 1:
            dist.all_reduce(loss_sum)
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                     if cfg.optim.grad_clip else torch.tensor(0.0))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += int(n_targets.item())
        do_eval = evaluate is not None and (step == cfg.run.steps or
                                            (eval_every and step % eval_every == 0))
        if step % cfg.run.log_every == 0 or step == cfg.run.steps or do_eval:
            now = time.perf_counter()
            last = dict(step=step, loss=loss_sum.item(), lr=scheduler.get_last_lr()[0],
                        grad_norm=float(grad_norm), tokens=tokens_seen,
                        tokens_per_s=(tokens_seen - tok_last) / max(1e-9, now - t_last))
            if do_eval and rank == 0:
                last.update(evaluate(model))
            t_last, tok_last = time.perf_counter(), tokens_seen  # evaluation time is not training time
            if metrics_log:
                metrics_log.write(last)
            if bar:
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
        if bar:
            bar.update(1)
        if rank == 0 and (step % cfg.run.save_every == 0 or step == cfg.run.steps):
            ckpt.save(out, step, model, optimizer, scheduler, data,
                      dict(tokens_seen=tokens_seen, autocast=amp_name), keep=cfg.run.keep_checkpoints)
    if bar:
        bar.close()
    if metrics_log:
        metrics_log.close()
    if world > 1:
        dist.barrier()
    return last


def _shard(batch: dict, rank: int, world: int, device: torch.device) -> dict:
    """This process's rows of a global micro-batch (every process reads the same data stream)."""
    n = batch["input_ids"].shape[0] // world
    return {k: v[rank * n:(rank + 1) * n].to(device) for k, v in batch.items()}


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
