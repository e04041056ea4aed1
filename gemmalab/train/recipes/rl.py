"""Policy-gradient RL on verifiable rewards and reward models: `gemmalab train rl CONFIG`.

    problems   a procedural task family (train.rewards.tasks: function writing scored by sandboxed
               unit tests, sorting, sequences, addition, GSM-style word problems), train split;
               held-out templates for evaluation
    rollout    rollout.num_generations samples per prompt from the policy (train.rollout, on the one
               generation core), seeded by (run.seed, step, micro-batch, global row): a resumed run
               and a torchrun run draw what an uninterrupted single process draws
    reward     [[reward.terms]]: code tests, answer checks, math-verify, reward models, combined by
               weighted sum with per-term normalisation and the Inada transform
               (train.rewards.combine); cached by sha256(term, problem, completion) in
               RUN_DIR/rewards.jsonl, so a resumed run re-scores nothing it scored before the kill
    KL         to the reference (the base with the adapter off, or the initial weights):
               algo.kl = "k1" in the reward (default, unbiased), "exact" (full-vocabulary per-token
               KL: detached in the reward + differentiated in the loss, the exact gradient), or
               "k3_loss" (GRPO's form; biased, for comparison; see train.losses.policy)
    algo       "rloo": advantage = R_i - mean of the other samples of its prompt (Ahmadian et al.
               2024); "reinforce": R (or R - batch mean); both with
               R_i = r_i - beta * KL_i; the loss is -sum_i A_i log pi(y_i) / (scored samples), so the
               step's gradient estimates that of E[r] - beta KL(pi || ref) per sample
    sampler    "model" (the trained fp32 model: exact) or "native" (the GGUF's blocks + the fp32 LoRA
               path: fast); the sampler / learner mismatch is logged and corrected by truncated
               importance ratios (rollout.tis_cap; 0 = off)

Unscorable samples (a verifier timeout, a sandbox failure) are left out of the advantage and of the
normalizer and counted (`unscored`), never scored 0. Everything else (AdamW, accumulation, torchrun,
checkpoints, resume, metrics) is `train.trainer.train_loop`.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..build import build_model_and_tokenizer
from ..config import (ConfigError, DataConfig, LoraConfig, ModelConfig, OptimConfig, RunConfig, Tables,
                      _one_of)
from ..data import IGNORE_INDEX
from ..trainer import setup_run, train_loop

__all__ = ["RLConfig", "check_rl_config", "train_rl", "rl_loss", "build_terms", "ProblemStream",
           "TERM_KINDS"]

ALGOS = ("rloo", "reinforce")
KL_ESTIMATORS = ("k1", "exact", "k3_loss")
# reward term kinds -> "module:Class" (lazy: a config is checked without importing every verifier)
TERM_KINDS = {"code_tests": "..rewards.verifiers:CodeTests",
              "answer": "..rewards.verifiers:AnswerMatch",
              "math": "..rewards.verifiers:MathAnswer",
              "rm": "..rewards.model:RewardModelTerm"}
TERM_COMMON = ("kind", "weight", "normalize", "transform", "tau", "floor", "theta", "phi")
DEFAULT_TERM = {"code": "code_tests", "humaneval": "code_tests", "gsm": "math"}  # others: "answer"
CODE_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```", "\n\n\n"]


@dataclass
class TasksSection:
    family: str = "code"  # a family of train.rewards.tasks.FAMILIES
    train: int = 256  # problems drawn for training (train templates)
    heldout: int = 64  # problems for evaluation (held-out templates)
    seed: int = 0
    options: dict = field(default_factory=dict)  # passed to make_problems (e.g. few_shot = 2)


@dataclass
class RolloutSection:
    num_generations: int = 4  # samples per prompt (RLOO needs >= 2)
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0  # 0 / 1.0: the full distribution (truncation biases the importance ratios)
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)  # text stops; empty: the family's defaults
    sampler: str = "model"  # "model" (exact fp32) | "native" (GGUF blocks + fp32 LoRA; LoRA only)
    exact_rows: bool = True  # sampler "model": each row decoded as if alone (False: one batched forward)
    tis_cap: float = 2.0  # truncated importance ratio cap (sampler "native"); 0 = no correction


@dataclass
class RewardSection:
    terms: Tables = field(default_factory=Tables)  # [[reward.terms]]; empty: the family's verifier
    sandbox_wall_s: float = 4.0  # code tests: wall-clock limit per program
    cache: bool = True  # RUN_DIR/rewards.jsonl (resume re-scores nothing)


@dataclass
class AlgoSection:
    name: str = "rloo"  # "rloo" | "reinforce"
    beta: float = 0.05  # KL(pi || ref) coefficient (TRL RLOO's default)
    kl: str = "k1"  # "k1" (in the reward) | "exact" | "k3_loss" (biased; see train.losses.policy)
    baseline: str = "none"  # reinforce: "none" | "batch_mean"


@dataclass
class EvalSection:
    every: int = 0  # evaluate on held-out problems every N steps (and at the end); 0 = never
    problems: int = 32  # of tasks.heldout
    temperature: float = 0.0  # 0 = greedy


@dataclass
class RLConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=256, batch_size=4))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=2, grad_clip=1.0))
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(rank=16))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/rl", steps=60, save_every=10))
    tasks: TasksSection = field(default_factory=TasksSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    reward: RewardSection = field(default_factory=RewardSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _resolve(spec: str):
    import importlib
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module, __package__), name)


def term_specs(cfg: RLConfig) -> list[dict]:
    """The reward terms as tables, the family's own verifier when none is configured."""
    if cfg.reward.terms:
        return [dict(t) for t in cfg.reward.terms]
    return [{"kind": DEFAULT_TERM.get(cfg.tasks.family, "answer")}]


def check_rl_config(cfg: RLConfig) -> RLConfig:
    """Refuse what cannot run, before any model is built or any step is taken."""
    from ..rewards import tasks
    from ..rewards.combine import NORMALIZATIONS, TRANSFORMS, inada

    a, r = cfg.algo, cfg.rollout
    _one_of("algo.name", a.name, ALGOS)
    _one_of("algo.kl", a.kl, KL_ESTIMATORS)
    _one_of("algo.baseline", a.baseline, ("none", "batch_mean"))
    _one_of("rollout.sampler", r.sampler, ("model", "native"))
    _one_of("tasks.family", cfg.tasks.family, tuple(tasks.FAMILIES))
    if a.name == "rloo" and r.num_generations < 2:
        raise ConfigError("algo.name = 'rloo' needs rollout.num_generations >= 2 (the baseline of a "
                          "sample is the mean of the others of its prompt)")
    if r.num_generations < 1 or r.max_new_tokens < 1:
        raise ConfigError("rollout.num_generations and rollout.max_new_tokens must be >= 1")
    if r.max_new_tokens >= cfg.data.seq_len:
        raise ConfigError(f"rollout.max_new_tokens ({r.max_new_tokens}) leaves no room for a prompt in "
                          f"data.seq_len ({cfg.data.seq_len})")
    if not a.beta >= 0:
        raise ConfigError(f"algo.beta must be >= 0, got {a.beta}")
    if not r.temperature > 0:
        raise ConfigError(f"rollout.temperature must be > 0 for policy-gradient samples, got {r.temperature}")
    if r.top_k < 0 or not 0.0 < r.top_p <= 1.0:
        raise ConfigError(f"rollout.top_k must be >= 0 and rollout.top_p in (0, 1]; got {r.top_k}, {r.top_p}")
    if r.tis_cap < 0:
        raise ConfigError(f"rollout.tis_cap must be >= 0 (0: off), got {r.tis_cap}")
    if r.sampler == "native" and not cfg.lora.rank:
        raise ConfigError("rollout.sampler = 'native' samples from the GGUF's blocks + the LoRA adapter: "
                          "set lora.rank > 0")
    if r.sampler == "native" and cfg.model.preset:
        raise ConfigError("rollout.sampler = 'native' needs a checkpoint with quantized blocks (model.path)")
    if cfg.tasks.train < 1:
        raise ConfigError("tasks.train must be >= 1")
    if cfg.eval.every and not 1 <= cfg.eval.problems <= cfg.tasks.heldout:
        raise ConfigError(f"eval.problems must be in [1, tasks.heldout = {cfg.tasks.heldout}]")
    if not cfg.reward.sandbox_wall_s > 0:
        raise ConfigError("reward.sandbox_wall_s must be > 0")
    for i, spec in enumerate(term_specs(cfg)):
        where = f"reward.terms[{i}]"
        kind = spec.get("kind")
        if kind not in TERM_KINDS:
            raise ConfigError(f"{where}.kind must be one of {', '.join(TERM_KINDS)}; got {kind!r}")
        for key in ("weight", "tau", "floor", "theta", "phi"):
            if key in spec and (isinstance(spec[key], bool) or not isinstance(spec[key], (int, float))):
                raise ConfigError(f"{where}.{key} must be a number, got {spec[key]!r}")
        if spec.get("normalize", "none") not in NORMALIZATIONS:
            raise ConfigError(f"{where}.normalize must be one of {', '.join(NORMALIZATIONS)}")
        if spec.get("transform", "none") not in TRANSFORMS:
            raise ConfigError(f"{where}.transform must be one of {', '.join(TRANSFORMS)}")
        if spec.get("transform", "none") != "none":
            try:
                tau = spec.get("tau", 0.5)
                inada(tau, tau=tau, floor=spec.get("floor", 0.0), theta=spec.get("theta", 1.0),
                      phi=spec.get("phi", 0.5))
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
        if kind == "rm":
            path = spec.get("path")
            if not isinstance(path, str) or not Path(path).exists():
                raise ConfigError(f"{where}: kind 'rm' needs `path`, an existing reward-model directory "
                                  f"(gemmalab train rm / gemmalab merge average); got {path!r}")
        try:  # the term's own options must be arguments of its class
            params = inspect.signature(_resolve(TERM_KINDS[kind])).parameters
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{where}: reward kind {kind!r} is unavailable here ({e})") from None
        extra = set(spec) - set(TERM_COMMON)
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            bad = sorted(extra - set(params))
            if bad:
                valid = sorted(set(TERM_COMMON) | set(params) - {"self", "sandbox"})
                raise ConfigError(f"unknown key(s) {bad} in {where} (kind {kind!r}); valid: {valid}")
    return cfg


def build_terms(cfg: RLConfig, device=None) -> list:
    """The configured reward terms as train.rewards.combine.Term objects."""
    from ..rewards.combine import Term

    out, sandbox = [], None
    for spec in term_specs(cfg):
        kind = spec["kind"]
        cls = _resolve(TERM_KINDS[kind])
        kwargs = {k: v for k, v in spec.items() if k not in TERM_COMMON}
        params = inspect.signature(cls).parameters
        if "sandbox" in params and "sandbox" not in kwargs:
            if sandbox is None:
                from ...sandbox import Sandbox
                sandbox = Sandbox(wall_s=cfg.reward.sandbox_wall_s)
            kwargs["sandbox"] = sandbox
        if "device" in params and device is not None:
            kwargs.setdefault("device", device)
        reward = cls(**kwargs)
        common = {k: spec[k] for k in TERM_COMMON if k in spec and k != "kind"}
        out.append(Term(reward, **common))
    names = [t.name for t in out]
    if len(set(names)) != len(names):  # the cache and the metrics are keyed by name
        for i, t in enumerate(out):
            t.reward.name = f"{t.reward.name}#{i}"
    return out


# ---------------------------------------------------------------------------------------------------
# Problems as a resumable stream of prompt batches

class ProblemStream:
    """Micro-batches of `batch_size` problems, reshuffled every epoch from (seed, epoch), as tensors
    the trainer can shard over torchrun processes: input_ids (prompt tokens, right-padded),
    prompt_len and problem_index."""

    def __init__(self, prompt_ids: list[list[int]], batch_size: int, seed: int, pad_id: int = 0):
        if not prompt_ids:
            raise ValueError("no problems to train on")
        self.prompt_ids, self.batch_size, self.seed, self.pad_id = prompt_ids, batch_size, seed, pad_id
        self.epoch, self.pos = 0, 0

    def _order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.prompt_ids), generator=gen).tolist()

    def __iter__(self):
        while True:
            order = self._order()
            while self.pos + self.batch_size <= len(order) or (len(order) < self.batch_size and self.pos == 0):
                idx = [order[(self.pos + i) % len(order)] for i in range(self.batch_size)]
                self.pos += self.batch_size
                width = max(len(self.prompt_ids[i]) for i in idx)
                ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
                for b, i in enumerate(idx):
                    ids[b, :len(self.prompt_ids[i])] = torch.tensor(self.prompt_ids[i])
                yield {"input_ids": ids, "prompt_len": torch.tensor([len(self.prompt_ids[i]) for i in idx]),
                       "problem_index": torch.tensor(idx)}
                if len(order) < self.batch_size:
                    break
            self.epoch, self.pos = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"kind": "problems", "n": len(self.prompt_ids), "batch_size": self.batch_size,
                "seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        mine = {"kind": "problems", "n": len(self.prompt_ids), "batch_size": self.batch_size, "seed": self.seed}
        diff = [k for k in mine if state.get(k) != mine[k]]
        if diff:
            raise ValueError(f"the saved data state belongs to another problem stream ({', '.join(diff)} "
                             "differ); resume with the same tasks and data.batch_size, or start afresh")
        self.epoch, self.pos = state["epoch"], state["pos"]


class PersistentRewardCache:
    """train.rewards.RewardCache whose entries are also appended to a JSONL file as they are scored, so
    samples scored after the last checkpoint (before a SIGKILL) are not scored again on resume. A torn
    last line (killed mid-write) is ignored."""

    def __init__(self, path: Path | None, resume: bool):
        from ..rewards import RewardCache

        self.cache, self.path = RewardCache(), path
        if path is not None and resume and path.exists():
            for line in path.read_text().splitlines():
                try:
                    key, entry = json.loads(line)
                except (ValueError, TypeError):
                    continue
                self.cache.entries[key] = entry
        elif path is not None and path.exists():
            path.unlink()  # a fresh run does not inherit another run's verdicts
        self._file = None

    def score(self, reward, problems, completions):
        before = set(self.cache.entries)
        results = self.cache.score(reward, problems, completions)
        if self.path is not None:
            new = [k for k in self.cache.entries if k not in before]
            if new:
                if self._file is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._file = open(self.path, "a", encoding="utf-8")
                for k in new:
                    self._file.write(json.dumps([k, self.cache.entries[k]]) + "\n")
                self._file.flush()
        return results

    def state_dict(self) -> dict:
        return self.cache.state_dict()

    def load_state_dict(self, state: dict) -> None:
        entries = dict(self.cache.entries)  # what the JSONL already had beyond the checkpoint
        self.cache.load_state_dict(state)
        self.cache.entries.update(entries)


def _seed(*ints: int) -> int:
    return hash(tuple(ints)) & 0x7FFF_FFFF


def _stops(cfg: RLConfig) -> list[str]:
    if cfg.rollout.stop:
        return list(cfg.rollout.stop)
    return CODE_STOPS if cfg.tasks.family in ("code", "humaneval") else ["\n"]


def score(terms, cache, problems, completions) -> tuple[list, dict, list[str]]:
    """Combined values (None = unscorable), each term's raw values, and each sample's worst status."""
    from ..rewards.combine import combine

    results = [cache.score(t.reward, problems, completions) for t in terms]
    values, raw = combine(terms, results)
    statuses = []
    for b in range(len(completions)):
        bad = [res[b].status for res in results if not res[b].scored]
        statuses.append(bad[0] if bad else "ok")
    comps = {}
    for t, res in zip(terms, results):
        for b, r in enumerate(res):
            for k, v in r.components.items():
                if isinstance(v, (int, float)):  # bools too: exact = True / False
                    comps.setdefault(f"{t.name}.{k}", [None] * len(res))[b] = float(v)
    raw.update(comps)
    return values, raw, statuses


def _prepare(cfg: RLConfig, problems, prompt_ids, tokenizer, terms, cache, rank: int, sampler=None):
    from ...generate import SamplingParams
    from ..rollout import rollout

    r = cfg.rollout
    G = r.num_generations
    params = SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
    stops = _stops(cfg)

    def prepare(model, batch, step, micro):
        idx = batch["problem_index"].tolist()
        B = len(idx)
        seed = _seed(cfg.run.seed, step, micro) + rank * B * G  # global row q samples with base + q
        ro = rollout(sampler or model, [prompt_ids[i] for i in idx], n=G, max_new_tokens=r.max_new_tokens,
                     params=params, stop_ids=list(tokenizer.stop_ids), seed=seed, seq_len=cfg.data.seq_len,
                     pad_id=tokenizer.pad_id, tokenizer=tokenizer, stop=stops, exact=r.exact_rows)
        probs = [problems[idx[j]] for j in ro.group.tolist()]
        values, raw, statuses = score(terms, cache, probs, ro.texts)
        out = {k: v.to(batch["input_ids"].device) for k, v in ro.rows.items()}
        out["reward"] = torch.tensor([0.0 if v is None else v for v in values], dtype=torch.float64)
        out["valid"] = torch.tensor([v is not None for v in values])
        out["sampler_logprobs"] = ro.sampler_logprobs
        out["completion_len"] = ro.completion_lens.double()
        for name, vals in raw.items():
            out["r:" + name] = torch.tensor([float("nan") if v is None else v for v in vals], dtype=torch.float64)
        return out
    return prepare


def _per_row_exact_kl(h, w, targets, ref_hidden, softcap) -> torch.Tensor:
    """(B,) sum over each row's sampled positions of the full-vocabulary KL(pi || ref), no gradient."""
    from .. import losses
    from ..teacher import head_logits

    out = torch.zeros(targets.shape[0], dtype=torch.float64)
    ref_fn = head_logits(ref_hidden, w, softcap)
    with torch.no_grad():
        for b in range(targets.shape[0]):
            t = torch.full_like(targets, IGNORE_INDEX)
            t[b] = targets[b]
            if (t != IGNORE_INDEX).any():
                out[b] = float(losses.reverse_kl_loss(h, w, t, ref_fn, softcap=softcap, normalizer=1.0))
    return out


def rl_loss(model, batch: dict, normalizer: float, cfg: RLConfig, roles) -> tuple[torch.Tensor, dict]:
    """The policy-gradient loss of one micro-batch (all samples of its prompts), and metrics.

    The reference (`roles`' "reference": the adapter off, or the initial weights) reads the same rows
    here, under the same autocast as the policy, so k1 = log pi - log ref carries no precision gap."""
    from .. import losses
    from ..losses.policy import (reinforce_advantages, rloo_advantages, sequence_kl_k1, sequence_kl_k3)
    from ..rollout import truncated_ratios
    from ..teacher import head_logits

    a, G = cfg.algo, cfg.rollout.num_generations
    w, cap, targets = model.embed_tokens.weight, model.config.final_logit_softcapping, batch["targets"]
    mask = targets != IGNORE_INDEX
    h = model.hidden_states(batch["input_ids"], batch["positions"], segment_ids=batch["segment_ids"])
    lp = losses.token_logprobs(h, w, targets, softcap=cap)
    with torch.no_grad(), roles.use("reference"):
        ref_h = model.hidden_states(batch["input_ids"], batch["positions"], segment_ids=batch["segment_ids"])
        ref_lp = losses.token_logprobs(ref_h, w, targets, softcap=cap)
    valid = batch["valid"]
    with torch.no_grad():
        kl_k1 = sequence_kl_k1(lp.detach().double(), ref_lp.double(), mask)
        if a.kl == "exact":
            kl_pen = _per_row_exact_kl(h.detach(), w.detach(), targets, ref_h, cap)
        elif a.kl == "k1":
            kl_pen = kl_k1
        else:
            kl_pen = torch.zeros_like(kl_k1)
        total = batch["reward"] - a.beta * kl_pen
        if a.name == "rloo":
            adv = rloo_advantages(total.view(-1, G), valid.view(-1, G)).view(-1)
        else:
            adv = reinforce_advantages(total, valid, a.baseline)
    rows = valid[:, None] & mask
    ratios = None
    sampler_lp = batch["sampler_logprobs"]
    if cfg.rollout.sampler == "native" and cfg.rollout.tis_cap > 0:
        ratios = truncated_ratios(lp, sampler_lp, mask, cfg.rollout.tis_cap)
    wgt = torch.ones_like(lp) if ratios is None else ratios
    loss = -(wgt * adv[:, None].to(lp.dtype) * lp * rows).sum() / normalizer
    if a.kl == "exact" and a.beta > 0:  # the pathwise part of the exact KL's gradient
        t = torch.where(rows, targets, torch.full_like(targets, IGNORE_INDEX))
        if (t != IGNORE_INDEX).any():
            ref_fn = head_logits(ref_h, w.detach(), cap)
            loss = loss + a.beta * losses.reverse_kl_loss(h, w, t, ref_fn, softcap=cap, normalizer=normalizer)
    elif a.kl == "k3_loss" and a.beta > 0:
        from ..losses.policy import token_kl_k3
        loss = loss + a.beta * (token_kl_k3(lp, ref_lp) * rows).sum() / normalizer
    v = valid.double()
    metrics = {"reward": (batch["reward"] * v).sum() / normalizer,
               "kl": (kl_k1 * v).sum() / normalizer,
               "kl_k3": (sequence_kl_k3(lp.detach().double(), ref_lp.double(), mask) * v).sum() / normalizer,
               "advantage_abs": (adv.abs().double() * v).sum() / normalizer,
               "completion_len": (batch["completion_len"] * v).sum() / normalizer,
               "unscored": (~valid).double().sum() / normalizer}
    for k in batch:
        if k.startswith("r:"):
            x = batch[k]
            ok = valid & ~torch.isnan(x)
            metrics[k[2:]] = torch.where(ok, x, torch.zeros_like(x)).sum() / normalizer
    if cfg.rollout.sampler == "native":  # KL(sampler || learner) per sample, k3 estimate on its tokens
        from ..losses.policy import token_kl_k3
        metrics["sampler_kl"] = (token_kl_k3(sampler_lp.double(), lp.detach().double()) * rows).sum() / normalizer
    return loss, metrics


def _evaluator(cfg: RLConfig, problems, prompt_ids, tokenizer, terms, cache, sampler=None):
    """Mean reward (and each component) on held-out problems, greedy by default; bootstrap-free here,
    the bench adds intervals."""
    from ...generate import SamplingParams, sample_batch

    idx = list(range(min(cfg.eval.problems, len(problems))))
    params = SamplingParams(temperature=cfg.eval.temperature, top_k=0, top_p=1.0)
    stops = _stops(cfg)

    def evaluate(model):
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                samples = sample_batch(sampler or model, [prompt_ids[i] for i in idx], n=1,
                                       max_new_tokens=cfg.rollout.max_new_tokens, params=params,
                                       stop_ids=list(tokenizer.stop_ids), seed=_seed(cfg.run.seed, -1),
                                       tokenizer=tokenizer, stop=stops)
        finally:
            model.train(was)
        values, raw, statuses = score(terms, cache, [problems[i] for i in idx], [s.text for s in samples])
        got = [v for v in values if v is not None]
        out = {"eval_reward": sum(got) / max(1, len(got)), "eval_unscored": float(len(values) - len(got))}
        for name, vals in raw.items():
            if name.endswith(".exact"):
                vv = [x for x in vals if x is not None]
                out["eval_exact"] = sum(vv) / max(1, len(vv))
        return out
    return evaluate


def train_rl(cfg: RLConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) an RL job; return the last logged metrics."""
    from ..rewards import tasks
    from ..roles import Roles

    rank, world, device = setup_run(cfg)
    model, tokenizer = build_model_and_tokenizer(cfg, device)
    if model.config.vocab_size > len(tokenizer):
        raise ConfigError(f"the model has {model.config.vocab_size} vocabulary entries but its tokenizer "
                          f"{len(tokenizer)}: samples could be ids no text has (set model.arch.vocab_size "
                          "for a preset)")
    roles = Roles(model)
    sampler = None
    if cfg.rollout.sampler == "native":
        from ...lm import load
        sampler = roles.attach_sampler(load(cfg.model.path, mode="native").model.requires_grad_(False))
    t = cfg.tasks
    train_problems = tasks.make_problems(t.family, t.train, t.seed, split="train", **t.options)
    prompt_ids = [tokenizer.encode(p.prompt, add_bos=True) for p in train_problems]
    limit = cfg.data.seq_len - cfg.rollout.max_new_tokens
    too_long = sum(len(p) > limit for p in prompt_ids)
    if too_long:
        raise ConfigError(f"{too_long} of {len(prompt_ids)} prompts are longer than data.seq_len - "
                          f"rollout.max_new_tokens = {limit} tokens: raise data.seq_len")
    terms = build_terms(cfg, device)
    out = Path(cfg.run.out_dir)
    cache = PersistentRewardCache(out / "rewards.jsonl" if cfg.reward.cache and rank == 0 else None,
                                  resume) if cfg.reward.cache else PersistentRewardCache(None, False)
    data = ProblemStream(prompt_ids, cfg.data.batch_size, cfg.run.seed, tokenizer.pad_id)
    evaluate = None
    if cfg.eval.every and t.heldout:
        held = tasks.make_problems(t.family, t.heldout, t.seed, split="heldout", **t.options)
        held_ids = [tokenizer.encode(p.prompt, add_bos=True) for p in held]
        evaluate = _evaluator(cfg, held, held_ids, tokenizer, terms, cache, sampler)
    if rank == 0:
        print(f"gemmalab train rl: {cfg.algo.name} (beta={cfg.algo.beta}, kl={cfg.algo.kl}), "
              f"{cfg.rollout.num_generations} samples per prompt, {len(train_problems)} {t.family} problems, "
              f"rewards: {', '.join(f'{x.weight}*{x.name}' for x in terms)}; samples from "
              f"{'the native-quantized base + LoRA' if sampler is not None else 'the trained model'}",
              file=sys.stderr, flush=True)

    def loss_fn(m, batch, normalizer):
        return rl_loss(m, batch, normalizer, cfg, roles)

    fields = ["reward", "kl", "kl_k3", "advantage_abs", "completion_len", "unscored"]
    fields += [x.name for x in terms] + (["sampler_kl"] if sampler is not None else [])
    if evaluate is not None:
        fields += ["eval_reward", "eval_exact", "eval_unscored"]
    return train_loop(cfg, model, data, loss_fn, rank=rank, world=world, device=device, resume=resume,
                      progress=progress, prepare=_prepare(cfg, train_problems, prompt_ids, tokenizer, terms,
                                                          cache, rank, sampler),
                      weight=lambda b: float(b["valid"].sum()), hooks=(),
                      extra_state={"reward_cache": cache}, evaluate=evaluate,
                      eval_every=cfg.eval.every, extra_fields=tuple(fields))
