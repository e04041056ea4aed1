"""On-policy distillation (GKD, Agarwal et al. 2024), end to end: `gemmalab train gkd CONFIG`.

    prompts    chat records (train.data.PromptDataset); a last model turn is the reference answer
    completion with probability lmbda the student's own samples (on-policy), else the reference
               answer (supervised KD) or the teacher's samples (SeqKD, Kim & Rush 2016)
    teacher    another model (gkd.teacher = a GGUF / HF path, forward-only), optionally with a fixed
               few-shot prefix (gkd.teacher_prefix: context distillation, the teacher sees the
               prefix, the student does not)
    loss       a divergence between the teacher's and the student's next-token distributions on the
               completion tokens, at a temperature: generalized JSD(beta), forward or reverse KL, or
               the Fenchel-Young alpha loss of Roulet et al. 2025 (train.losses); chunked over the
               vocabulary, never the tokens x 262k logits

The choice of completion source is drawn per micro-batch from a generator seeded by (run.seed, step,
micro-batch, rank), and so is the sampling: a resumed run draws exactly what an uninterrupted one
would. Samples are drawn under no_grad in `prepare` (the loop's hook that may run the model), so no
gradient flows through sampling, as in GKD. Everything else (AdamW, accumulation, torchrun,
checkpoints, resume, metrics) is `train.trainer.train_loop`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass, field

import torch

from ..build import build_model_and_tokenizer, load_frozen
from ..config import (ConfigError, DataConfig, LoraConfig, ModelConfig, OptimConfig, RunConfig,
                      _one_of)
from ..data import IGNORE_INDEX, PromptDataset, completion_row
from ..teacher import head_logits
from ..trainer import setup_run, train_loop

__all__ = ["GKDSection", "GKDConfig", "check_gkd_config", "train_gkd", "gkd_loss", "sample_completions"]

DIVERGENCES = ("jsd", "fkl", "rkl", "fy")
OFF_POLICY = ("dataset", "teacher")


@dataclass
class GKDSection:
    """See docs/post_training.md. Field names follow TRL's GKDConfig where the concept matches."""
    lmbda: float = 0.5  # probability that a micro-batch's completions are the student's own samples
    off_policy: str = "dataset"  # otherwise: "dataset" (the reference answers) or "teacher" (its samples)
    divergence: str = "jsd"  # "jsd" (generalized JSD(beta)), "fkl", "rkl", "fy" (Fenchel-Young alpha)
    beta: float = 0.5  # JSD(beta): 0 -> forward KL, 1 -> reverse KL (with jsd_scale = "normalized")
    jsd_scale: str = "normalized"  # "normalized" (continuous at beta in {0, 1}) or "paper" (JSD itself)
    alpha: float = 1.5  # divergence = "fy": the alpha-divergence generator (1 = softmax CE)
    temperature: float = 1.0  # of both distributions in the loss and of the samples
    teacher: str | None = None  # GGUF / HF directory; None = the embedded 270M; "base": the student's
    #                             own base with the adapter off (context distillation, needs LoRA)
    teacher_mode: str = "fp32"  # "fp32" (exact) or "native" (the GGUF's own blocks)
    sampler: str = "model"  # on-policy samples from "model" (the trained fp32 model: exact) or
    #                         "native" (the GGUF's own blocks + the fp32 LoRA path: fast, LoRA only)
    exact_rows: bool = True  # sampler = "model": each row decoded as if alone (a sample does not depend
    #                          on the rows beside it, so 2 torchrun processes draw what 1 does); False
    #                          decodes the micro-batch in one forward (faster; resume stays exact)
    teacher_prefix: str = ""  # text the teacher sees before every prompt (few-shot / system prompt)
    max_new_tokens: int = 64  # sampled completion length (prompt + completion <= data.seq_len)
    top_k: int = 0  # sampling filters; 0 / 1.0 sample the full distribution (what GKD assumes)
    top_p: float = 1.0


@dataclass
class GKDConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=256, batch_size=4))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=5))
    lora: LoraConfig = field(default_factory=LoraConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/gkd", steps=100, save_every=20))
    gkd: GKDSection = field(default_factory=GKDSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_gkd_config(cfg: GKDConfig) -> GKDConfig:
    g = cfg.gkd
    _one_of("gkd.divergence", g.divergence, DIVERGENCES)
    _one_of("gkd.off_policy", g.off_policy, OFF_POLICY)
    _one_of("gkd.jsd_scale", g.jsd_scale, ("normalized", "paper"))
    _one_of("gkd.teacher_mode", g.teacher_mode, ("fp32", "native"))
    _one_of("gkd.sampler", g.sampler, ("model", "native"))
    if g.teacher == "base" and not cfg.lora.rank:
        raise ConfigError("gkd.teacher = 'base' is the student's base with its adapter off: train a "
                          "LoRA adapter (lora.rank > 0), or name a teacher model")
    if g.teacher == "base" and not g.teacher_prefix:
        raise ConfigError("gkd.teacher = 'base' teaches what the base does after gkd.teacher_prefix "
                          "(context distillation): set the prefix (e.g. few-shot examples)")
    if g.sampler == "native" and not cfg.lora.rank:
        raise ConfigError("gkd.sampler = 'native' samples from the GGUF's blocks + the LoRA adapter: set "
                          "lora.rank > 0 (full fine-tuning changes every weight: use gkd.sampler = 'model')")
    if g.sampler == "native" and cfg.model.preset:
        raise ConfigError("gkd.sampler = 'native' needs a checkpoint with quantized blocks (model.path), "
                          "not a preset")
    if not 0.0 <= g.lmbda <= 1.0:
        raise ConfigError(f"gkd.lmbda is a probability, in [0, 1]; got {g.lmbda}")
    if not 0.0 <= g.beta <= 1.0:
        raise ConfigError(f"gkd.beta must be in [0, 1], got {g.beta}")
    if not g.alpha >= 1.0:
        raise ConfigError(f"gkd.alpha must be >= 1 (1 is softmax cross-entropy), got {g.alpha}")
    if not g.temperature > 0:
        raise ConfigError(f"gkd.temperature must be > 0, got {g.temperature}")
    if g.max_new_tokens < 1:
        raise ConfigError(f"gkd.max_new_tokens must be >= 1, got {g.max_new_tokens}")
    if g.max_new_tokens >= cfg.data.seq_len:
        raise ConfigError(f"gkd.max_new_tokens ({g.max_new_tokens}) leaves no room for a prompt in "
                          f"data.seq_len ({cfg.data.seq_len}): raise data.seq_len")
    if g.top_k < 0 or not 0.0 < g.top_p <= 1.0:
        raise ConfigError(f"gkd.top_k must be >= 0 and gkd.top_p in (0, 1]; got {g.top_k}, {g.top_p}")
    if not cfg.data.train:
        raise ConfigError("data.train lists no prompt files (chat JSONL / Parquet records)")
    return cfg


# ---------------------------------------------------------------------------------------------------
# Sampling (no gradients: GKD does not differentiate through the student's samples)

@torch.no_grad()
def sample_completions(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                       top_k: int, top_p: float, stop_ids: list[int], seed: int,
                       with_logprobs: bool = False, exact: bool = True):
    """One sampled completion per prompt through the generation core, each ending at its first stop
    id (kept) or at the length. Prompt j samples with seed + j and its row computes what it would
    alone, so a sample does not depend on which rows share its batch (or its process). With
    with_logprobs, (completions, per-token log-probs under the distribution sampled from)."""
    from ...generate import SamplingParams, sample_batch

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    samples = sample_batch(model, prompts, n=1, max_new_tokens=max_new_tokens, params=params,
                           stop_ids=stop_ids, seed=seed, exact=exact)
    tokens = [s.token_ids for s in samples]
    return (tokens, [s.logprobs for s in samples]) if with_logprobs else tokens


def _seed(*ints: int) -> int:
    """A 31-bit seed from ints (hashes of int tuples do not depend on PYTHONHASHSEED)."""
    return hash(tuple(ints)) & 0x7FFF_FFFF


# ---------------------------------------------------------------------------------------------------
# The loss of one micro-batch

def gkd_loss(model, batch: dict, normalizer: float, cfg: GKDConfig, teacher: "Teacher"
             ) -> tuple[torch.Tensor, dict]:
    """The divergence on the completion tokens of one micro-batch (summed / normalizer), and metrics.

    batch holds the rows (input_ids, positions, segment_ids, targets: the completion's tokens) and
    `teacher_hidden`, the teacher's final hidden states at the same positions (see `_prepare`)."""
    from .. import losses

    g = cfg.gkd
    h = model.hidden_states(batch["input_ids"], batch["positions"], segment_ids=batch["segment_ids"])
    w, cap, targets = model.embed_tokens.weight, model.config.final_logit_softcapping, batch["targets"]
    teacher_fn = head_logits(batch["teacher_hidden"], teacher.weight, teacher.softcap)
    if g.divergence == "fkl":
        loss = losses.forward_kl_loss(h, w, targets, teacher_fn, temperature=g.temperature, softcap=cap,
                                      normalizer=normalizer)
    elif g.divergence == "rkl":
        loss = losses.reverse_kl_loss(h, w, targets, teacher_fn, temperature=g.temperature, softcap=cap,
                                      normalizer=normalizer)
    elif g.divergence == "jsd":
        loss = losses.generalized_jsd(h, w, targets, teacher_fn, beta=g.beta, temperature=g.temperature,
                                      scale=g.jsd_scale, softcap=cap, normalizer=normalizer)
    else:
        loss = losses.fy_kd_loss(h, w, targets, teacher_fn, alpha=g.alpha, temperature=g.temperature,
                                 softcap=cap, normalizer=normalizer)
    # metrics, like the loss, are sums over target tokens / normalizer: the trainer logs their mean
    # per completion token over the step (all micro-batches and processes)
    n = (targets != IGNORE_INDEX).sum()
    metrics = {"on_policy": batch["on_policy"].float().mean() * n / normalizer,
               "tokens_per_target": (batch["positions"] >= 0).sum() / normalizer}
    if "sampler_logprobs" in batch:  # KL(sampler || learner) per sampled token, k3 estimate
        with torch.no_grad():
            learner = losses.token_logprobs(h.detach(), w, targets, softcap=cap)
        log_r = (learner - batch["sampler_logprobs"])[targets != IGNORE_INDEX].double()
        metrics["sampler_kl"] = (log_r.exp() - 1 - log_r).sum() / normalizer
    return loss, metrics


# ---------------------------------------------------------------------------------------------------
# The teacher: another model, or the student's own base with the adapter off (context distillation)

class Teacher:
    """What the recipe needs of the teacher: its final hidden states at a batch's positions (the
    prefix, if any, read first), its head (tied embedding, soft-cap), and a model to sample from."""

    def __init__(self, model, prefix: list[int], bos_id: int, roles=None):
        self.model, self.prefix, self.roles = model, prefix, roles
        self.weight = model.embed_tokens.weight
        self.softcap = model.config.final_logit_softcapping
        self.vocab_size = model.config.vocab_size
        # the base after <bos> prefix, its KV computed once (train.roles.PrefixTeacher)
        self.cached = roles.prefix_teacher([bos_id] + prefix) if roles is not None and prefix else None

    def role(self):
        """The base's reference role (adapter off) for the duration of a call, or nothing."""
        return self.roles.use("reference") if self.roles is not None else contextlib.nullcontext()

    @torch.no_grad()
    def hidden(self, batch: dict) -> torch.Tensor:
        if self.cached is not None:  # rows start with <bos>: the cache holds <bos> prefix
            h = self.cached.hidden_states(batch["input_ids"][:, 1:])
            return torch.cat([torch.zeros_like(h[:, :1]), h], 1)  # <bos> predicts a prompt token
        with self.role():
            return teacher_hidden(self.model, batch, self.prefix)


def _prepare(cfg: GKDConfig, teacher: Teacher, tokenizer, rank: int, sampler=None):
    """Per micro-batch: on-policy with probability lmbda (one draw for the whole micro-batch, the same
    on every process), the completions sampled with one seed per global row, then the teacher's
    hidden states. `sampler`: the model that draws on-policy samples (default: the trained one)."""
    g = cfg.gkd
    stop_ids = list(tokenizer.stop_ids)

    def prepare(model, batch, step, micro):
        gen = torch.Generator().manual_seed(_seed(cfg.run.seed, step, micro, 0))
        on_policy = bool(torch.rand((), generator=gen) < g.lmbda)
        B = batch["input_ids"].shape[0]
        seed = _seed(cfg.run.seed, step, micro, 1) + rank * B  # global row r samples with base + r
        sampler_lp = None
        if on_policy or g.off_policy == "teacher":
            prompts = [batch["input_ids"][b, :int(batch["prompt_len"][b])].tolist() for b in range(B)]
            kw = dict(max_new_tokens=g.max_new_tokens,  # fits: PromptDataset's max_prompt_len
                      temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, stop_ids=stop_ids, seed=seed)
            if on_policy:
                completions, logprobs = sample_completions(sampler or model, prompts, with_logprobs=True,
                                                           exact=g.exact_rows, **kw)
            else:  # SeqKD: the teacher's samples, the teacher reading its prefix
                with teacher.role():
                    completions = sample_completions(
                        teacher.model, [_with_prefix(p, teacher.prefix) for p in prompts], **kw)
            rows = [completion_row(p, c, cfg.data.seq_len, tokenizer.pad_id) for p, c in zip(prompts, completions)]
            batch = {k: torch.stack([r[k] for r in rows]).to(batch["input_ids"].device) for k in rows[0]}
            if on_policy and sampler is not None:  # the sampler is not the learner: measure how far
                sampler_lp = torch.zeros(batch["targets"].shape)
                for b, (p, lp) in enumerate(zip(prompts, logprobs)):
                    kept = min(len(lp), cfg.data.seq_len - len(p))
                    sampler_lp[b, len(p) - 1:len(p) - 1 + kept] = torch.tensor(lp[:kept])
        batch["on_policy"] = torch.full((B,), on_policy)
        if sampler_lp is not None:
            batch["sampler_logprobs"] = sampler_lp.to(batch["input_ids"].device)
        batch["teacher_hidden"] = teacher.hidden(batch)
        return batch
    return prepare


def _with_prefix(prompt: list[int], prefix: list[int]) -> list[int]:
    """The teacher's view of a prompt: the prefix after the prompt's <bos>."""
    if not prefix:
        return prompt
    return prompt[:1] + prefix + prompt[1:]


@torch.no_grad()
def teacher_hidden(teacher, batch: dict, prefix: list[int]) -> torch.Tensor:
    """The teacher's final hidden states (B, T, d) at the rows' positions; with a prefix, the teacher
    reads <bos> prefix rest-of-row, and the states of the row's own tokens are returned."""
    ids, pos, seg = batch["input_ids"], batch["positions"], batch["segment_ids"]
    if not prefix:
        return teacher.hidden_states(ids, pos, segment_ids=seg)
    B, T = ids.shape
    P = len(prefix)
    pre = torch.tensor(prefix, device=ids.device).expand(B, P)
    ids2 = torch.cat([ids[:, :1], pre, ids[:, 1:]], 1)
    shifted = torch.where(pos >= 0, pos + P, pos)
    pos2 = torch.cat([pos[:, :1], torch.arange(1, P + 1, device=ids.device).expand(B, P), shifted[:, 1:]], 1)
    seg2 = torch.cat([seg[:, :1], seg[:, :1].expand(B, P), seg[:, 1:]], 1)
    h = teacher.hidden_states(ids2, pos2, segment_ids=seg2)
    return torch.cat([h[:, :1], h[:, P + 1:]], 1)


def train_gkd(cfg: GKDConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a GKD job; return the last logged metrics."""
    from ..roles import Roles

    g = cfg.gkd
    rank, world, device = setup_run(cfg)
    if g.teacher == "base":
        model, tokenizer = build_model_and_tokenizer(cfg, device)
        teacher_model = model
    else:
        teacher_model, teacher_tok = load_frozen(g.teacher, device, mode=g.teacher_mode)
        model, tokenizer = build_model_and_tokenizer(cfg, device, teacher_tok)
    if teacher_model.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the teacher has {teacher_model.config.vocab_size} vocabulary entries, the "
                         f"student {model.config.vocab_size}: distillation needs the same vocabulary")
    roles = Roles(model) if cfg.lora.rank and (g.teacher == "base" or g.sampler == "native") else None
    sampler = None
    if g.sampler == "native":
        from ...lm import load
        sampler = roles.attach_sampler(load(cfg.model.path, mode="native").model.requires_grad_(False))
    prefix = tokenizer.encode(g.teacher_prefix, add_bos=False) if g.teacher_prefix else []
    teacher = Teacher(teacher_model, prefix, tokenizer.bos_id, roles if g.teacher == "base" else None)
    data = PromptDataset(cfg.data.train, tokenizer, cfg.data.seq_len, cfg.data.batch_size, seed=cfg.run.seed,
                         max_prompt_len=cfg.data.seq_len - g.max_new_tokens,
                         shuffle_buffer=cfg.data.shuffle_buffer)
    if rank == 0:
        print(f"gemmalab train gkd: {g.divergence}"
              + (f"(beta={g.beta}, {g.jsd_scale})" if g.divergence == "jsd" else "")
              + (f"(alpha={g.alpha})" if g.divergence == "fy" else "")
              + f", lmbda={g.lmbda} on-policy, else {g.off_policy}; teacher "
              + ("the base with the adapter off" if g.teacher == "base" else g.teacher or "the embedded 270M")
              + (f" after a {len(prefix)}-token prefix" if prefix else "")
              + f"; samples from {'the native-quantized base + LoRA' if sampler is not None else 'the trained model'}",
              file=sys.stderr, flush=True)

    def loss_fn(m, batch, normalizer):
        return gkd_loss(m, batch, normalizer, cfg, teacher)

    fields = ("on_policy", "tokens_per_target") + (("sampler_kl",) if sampler is not None else ())
    return train_loop(cfg, model, data, loss_fn, rank=rank, world=world, device=device, resume=resume,
                      progress=progress, prepare=_prepare(cfg, teacher, tokenizer, rank, sampler),
                      extra_fields=fields)
