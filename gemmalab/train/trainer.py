"""The training loop every recipe runs, free of any recipe.

    for each optimizer step:
        micro-batches   <- data, sharded over torchrun processes
        prepare(model, batch, step, micro)     may run the model: teacher targets, on-policy samples
        normalizer      <- sum of weight(batch) over the step's micro-batches and processes
        loss_fn(model, batch, normalizer)      -> loss, or (loss, metrics); backward per micro-batch
        clip, AdamW step, schedule
        hooks(model, step)                     after the optimizer step: an EMA anchor, a monitor
        log every run.log_every, evaluate every eval_every, checkpoint every run.save_every

A recipe is then a short script: build its models (`train.build`, `train.roles`), its data, its loss
and hooks, and call `train_loop`. mlx-lm's `tuner/trainer.train` and torchtune's recipes over
`torchtune.training` are cut the same way.

Normalisation. `loss_fn` returns the summed per-token losses of its micro-batch divided by
`normalizer`, the GLOBAL weight of the whole optimizer step (all micro-batches, all processes; by
default the number of target tokens, `weight` overrides it): the accumulated gradient then equals
that of one big batch however the tokens fall into micro-batches. DistributedDataParallel averages
gradients over its W processes, so the normalizer is the global weight / W. Metrics a loss_fn
returns are normalised the same way: the trainer sums them over micro-batches and processes, so a
logged metric is the step's weighted mean.

State. Checkpoints (train.checkpoint) hold the trainable weights, optimizer, schedule, data position,
RNG and `extra_state`: named objects with `state_dict()` / `load_state_dict()` (an EMA anchor, a
reward cache) saved atomically with the step they belong to, so a run killed at any moment resumes
bitwise.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .data import IGNORE_INDEX

__all__ = ["train_loop", "setup_run", "setup_distributed", "pick_device", "make_optimizer",
           "lr_lambda", "autocast_choice", "autocast_dtype", "vocab_products_choice", "LossModule", "target_tokens", "Stateful"]


class Stateful(Protocol):
    """Extra state a recipe checkpoints with the model (an EMA anchor, a reward cache, ...)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def target_tokens(batch: dict) -> float:
    """The default weight of a micro-batch: its target tokens (targets != IGNORE_INDEX)."""
    return float(int((batch["targets"] != IGNORE_INDEX).sum()))


def lr_lambda(cfg):
    warmup, total, floor = cfg.optim.warmup_steps, cfg.run.steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
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

    Under autocast the blocks run in bf16; the chunked losses compute in fp32, their vocabulary-sized
    products in `vocab_products` (fp32, or bf16 with the logits widened before any loss).
    """

    def __init__(self, model: torch.nn.Module, autocast_dtype: torch.dtype | None, loss_fn,
                 vocab_products: torch.dtype | None = None):
        super().__init__()
        self.model, self.autocast_dtype, self.loss_fn = model, autocast_dtype, loss_fn
        self.vocab_products = vocab_products

    def forward(self, batch: dict, normalizer: float):
        from .losses.vocab import vocab_products

        if self.autocast_dtype is None:
            with vocab_products(self.vocab_products):
                return self.loss_fn(self.model, batch, normalizer)
        device_type = batch["input_ids"].device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype), vocab_products(self.vocab_products):
            return self.loss_fn(self.model, batch, normalizer)


def vocab_products_choice(cfg, amp_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of the chunked losses' vocabulary-sized products: model.vocab_products = "auto" follows
    autocast (bf16 products under bf16 autocast), "float32" keeps them fp32."""
    choice = cfg.model.vocab_products
    if choice not in ("auto", "float32"):
        raise ValueError(f"model.vocab_products must be 'auto' or 'float32', got {choice!r}")
    return torch.bfloat16 if choice == "auto" and amp_dtype == torch.bfloat16 else torch.float32


def autocast_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training (fp32 master weights either way), or None for plain fp32.

    model.autocast = "auto": bf16 on CUDA; on CPU bf16 where `gemmalab.cpu.cpu_bf16()` says so (the
    CPU has native bf16 dot products, AVX512_BF16 or AMX-BF16; GEMMALAB_CPU_BF16=0|1 overrides),
    fp32 elsewhere. "bfloat16" and "none" force the choice.
    """
    return autocast_choice(cfg, device)[0]


def autocast_choice(cfg, device: torch.device) -> tuple[torch.dtype | None, str]:
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


def train_loop(cfg, model: torch.nn.Module, data, loss_fn, *, rank: int, world: int,
               device: torch.device, resume: bool = False, progress: bool = True,
               prepare: Callable | None = None, weight: Callable[[dict], float] = target_tokens,
               hooks: tuple[Callable, ...] = (), extra_state: dict[str, Stateful] | None = None,
               evaluate: Callable | None = None, eval_every: int = 0,
               extra_fields: tuple[str, ...] = ()) -> dict:
    """The optimizer loop of every recipe; returns the last logged metrics.

    AdamW + warmup/cosine, `cfg.optim.grad_accum` micro-batches per step normalised by the global
    weight, DistributedDataParallel under torchrun, gradient clipping, metrics (JSONL/CSV/
    TensorBoard), atomic checkpoints every `cfg.run.save_every` steps and exact resume (`data`
    needs `state_dict` / `load_state_dict`).

    loss_fn(model, batch, normalizer) -> loss, or (loss, {name: tensor or float}): the micro-batch's
        summed losses / normalizer (see the module docstring).
    prepare(model, batch, step, micro) -> batch: runs on this process's rows after sharding, with
        gradients off and the model in eval mode, e.g. to add teacher targets or replace the rows by
        the policy's own samples; `step` is the optimizer step being computed, `micro` the index of
        the micro-batch in it (seed anything random from them, so a resumed run draws the same).
    weight(batch) -> float: the micro-batch's share of the normalizer (default: its target tokens).
    hooks: hook(model, step) after every optimizer step (`step` counts completed steps), e.g. an EMA
        update of an anchor; what they change belongs in `extra_state` to be resumed.
    extra_state: {name: object with state_dict / load_state_dict}, checkpointed and resumed.
    evaluate(model) -> dict of metrics, on rank 0 every `eval_every` steps and at the end; its keys
        (listed in `extra_fields` for the CSV) join that step's metrics row. Metrics returned by
        loss_fn are logged too; list their names in `extra_fields` to have them in the CSV.
    """
    out = Path(cfg.run.out_dir)
    extra_state = dict(extra_state or {})
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    step, tokens_seen, state = 0, 0, {}
    if resume and ckpt.latest(out) is not None:
        state = ckpt.load(ckpt.latest(out), model, optimizer, scheduler, data, extra_state=extra_state)
        step, tokens_seen = state["step"], state["tokens_seen"]
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2).encode())
    metrics_log = (ckpt.MetricsLog(out / "metrics.jsonl", truncate_after=step,
                                   fields=ckpt.MetricsLog.FIELDS + tuple(extra_fields))
                   if rank == 0 else None)
    amp_dtype, amp_note = autocast_choice(cfg, device)
    amp_name = "none" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
    products = vocab_products_choice(cfg, amp_dtype)
    if products != torch.float32:
        amp_note += ("; loss logits from bf16 products, losses in fp32 (model.vocab_products='float32' "
                     "for fp32 products)")
    if rank == 0:
        print(f"gemmalab train: {amp_note}", file=sys.stderr, flush=True)
        if resume and state.get("autocast", amp_name) != amp_name:
            print(f"gemmalab train: note: the checkpoint was trained with autocast "
                  f"{state['autocast']}, this run continues with {amp_name}", file=sys.stderr, flush=True)
    step_module = LossModule(model, amp_dtype, loss_fn, products)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        step_module = DistributedDataParallel(step_module)

    sparse_embeddings = _sparse_embedding_grads(model) if world == 1 else []
    try:
        return _loop(cfg, model, data, optimizer, scheduler, step_module, prepare, weight, hooks,
                     metrics_log, out, rank, world, device, step, tokens_seen, progress, amp_name,
                     extra_state, evaluate, eval_every)
    finally:
        for emb in sparse_embeddings:
            emb.sparse = False


def _sparse_embedding_grads(model: torch.nn.Module) -> list:
    """Let the trainable token embeddings hand autograd sparse gradients for one process.

    Gemma ties the embedding to the LM head: the chunked loss gives the (V, d) table a dense
    gradient, and a dense embedding backward would add a second one (a zeroed 670 MB array, then a
    sum; ~0.5 s of a 3 s bf16 step on the 270M, measured). A sparse one is added into the loss's in
    place. Not under DistributedDataParallel, which expects the layout a module declares; grads
    left sparse (a loss that never touches the head) are made dense before the optimizer."""
    out = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Embedding) and not mod.sparse and mod.weight.requires_grad:
            mod.sparse = True
            out.append(mod)
    return out


def _densify_grads(model: torch.nn.Module) -> None:
    for p in model.parameters():
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()


def _loop(cfg, model, data, optimizer, scheduler, step_module, prepare, weight, hooks, metrics_log, out,
          rank, world, device, step, tokens_seen, progress, amp_name, extra_state, evaluate, eval_every):
    batches = iter(data)
    bar = _progress(cfg.run.steps, step, progress and rank == 0)
    last: dict = {}
    t_last, tok_last = time.perf_counter(), tokens_seen
    while step < cfg.run.steps:
        micro = [_shard(next(batches), rank, world, device) for _ in range(cfg.optim.grad_accum)]
        if prepare is not None:
            micro = _prepared(model, prepare, micro, step)
        n_targets = torch.tensor(float(sum(weight(b) for b in micro)), device=device)
        if world > 1:
            dist.all_reduce(n_targets)
        normalizer = max(1.0, n_targets.item()) / world  # DDP averages gradients over processes
        loss_sum = torch.zeros((), device=device)
        sums: dict[str, torch.Tensor] = {}
        for i, b in enumerate(micro):
            sync = world == 1 or i == len(micro) - 1  # all-reduce gradients once per step
            with contextlib.nullcontext() if sync else step_module.no_sync():
                loss, metrics = _split(step_module(b, normalizer))
                loss.backward()
            loss_sum += loss.detach() / world
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float64).detach().cpu() / world
        if world > 1:
            dist.all_reduce(loss_sum)
            sums = _all_reduce_dict(sums)
        _densify_grads(model)
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                     if cfg.optim.grad_clip else torch.tensor(0.0))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += int(n_targets.item())
        for hook in hooks:
            hook(model, step)
        do_eval = evaluate is not None and (step == cfg.run.steps or
                                            (eval_every and step % eval_every == 0))
        if step % cfg.run.log_every == 0 or step == cfg.run.steps or do_eval:
            now = time.perf_counter()
            last = dict(step=step, loss=loss_sum.item(), lr=scheduler.get_last_lr()[0],
                        grad_norm=float(grad_norm), tokens=tokens_seen,
                        tokens_per_s=(tokens_seen - tok_last) / max(1e-9, now - t_last))
            last.update({k: float(v) for k, v in sums.items()})
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
                      dict(tokens_seen=tokens_seen, autocast=amp_name), keep=cfg.run.keep_checkpoints,
                      extra_state=extra_state)
    if bar:
        bar.close()
    if metrics_log:
        metrics_log.close()
    if world > 1:
        dist.barrier()
    return last


def _prepared(model: torch.nn.Module, prepare: Callable, micro: list[dict], step: int) -> list[dict]:
    """prepare(...) on every micro-batch with gradients off and the model in eval mode (dropout-free
    sampling), then back in train mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [prepare(model, b, step, i) for i, b in enumerate(micro)]
    finally:
        model.train(was_training)


def _split(out) -> tuple[torch.Tensor, dict]:
    if isinstance(out, tuple):
        loss, metrics = out
        return loss, dict(metrics)
    return out, {}


def _all_reduce_dict(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum named scalars over processes (every process returns the same names)."""
    if not values:
        return values
    names = sorted(values)
    t = torch.stack([values[k].double() for k in names])
    dist.all_reduce(t)
    return dict(zip(names, t))


def _shard(batch: dict, rank: int, world: int, device: torch.device) -> dict:
    """This process's rows of a global micro-batch (every process reads the same data stream)."""
    n = batch["input_ids"].shape[0] // world
    return {k: v[rank * n:(rank + 1) * n].to(device) for k, v in batch.items()}


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
