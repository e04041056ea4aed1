"""The recipes `gemmalab train RECIPE CONFIG` runs, in one registry the CLI and its help iterate.

A recipe is a short script over the shared components (train.trainer, train.build, train.roles,
train.losses, train.data): it owns its config class (common sections from train.config plus its own
section) and a check that refuses combinations that cannot run. Registering one here is all it takes
to appear in `gemmalab train --help`, to get `--resume`, overrides and the run directory.

Imports stay lazy (`run` and `config` are "module:attribute" strings): the CLI lists recipes without
importing torch-heavy modules.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["Recipe", "RECIPES", "register", "get_recipe", "load_recipe_config", "run_recipe"]


@dataclass(frozen=True)
class Recipe:
    name: str
    help: str  # one line, for `gemmalab train --help`
    description: str  # for `gemmalab train NAME --help`
    config: str  # "module:Class" of its config dataclass
    run: str  # "module:function": run(cfg, resume=..., progress=...) -> last metrics row
    check: str | None = None  # "module:function": check(cfg) -> cfg, raising ConfigError
    summary: Callable[[dict, object], str] | None = None  # the line printed after the run

    def resolve(self, attr: str):
        module, _, name = getattr(self, attr).partition(":")
        return getattr(importlib.import_module(module, __name__), name)


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    if recipe.name in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is registered twice")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}") from None


def load_recipe_config(name: str, path: str | Path | None, overrides: list[str] = ()):
    """The recipe's config from a TOML / YAML / JSON file plus `section.key=value` overrides, checked."""
    from ..config import apply_overrides, build_config, read_config_file

    recipe = get_recipe(name)
    raw = read_config_file(path) if path else {}
    cfg = build_config(apply_overrides(raw, list(overrides)), recipe.resolve("config"))
    return recipe.resolve("check")(cfg) if recipe.check else cfg


def run_recipe(name: str, cfg, resume: bool = False, progress: bool = True) -> dict:
    return get_recipe(name).resolve("run")(cfg, resume=resume, progress=progress)


def _evals(last: dict) -> str:
    return "".join(f", {k} {last[k]:.4f}" for k in ("eval_ce", "eval_kl") if k in last)


_OVERRIDES = "Fields of CONFIG (TOML/YAML/JSON) can be overridden as section.key=value, e.g. "

register(Recipe(
    "sft", "supervised fine-tuning (full or LoRA)",
    _OVERRIDES + "optim.lr=1e-4 run.steps=100.",
    config="..config:SFTConfig", run=".sft:train_sft", check="..config:check_sft_config",
    summary=lambda last, cfg: f"step {last['step']}: loss {last['loss']:.4f}; checkpoints in "
                              f"{cfg.run.out_dir}"))
register(Recipe(
    "distill", "distillation from a teacher-logit store or an online teacher",
    _OVERRIDES + "distill.loss=full run.steps=100.",
    config="..config:DistillConfig", run=".distill:train_distill", check="..config:check_distill_config",
    summary=lambda last, cfg: f"step {last['step']}: loss {last['loss']:.4f}{_evals(last)}; "
                              f"checkpoints in {cfg.run.out_dir}"))
register(Recipe(
    "qat", "quantization-aware training (Q4_0, int4 per channel, SFP8) self-distilled from the "
           "full-precision checkpoint",
    _OVERRIDES + "qat.format=int4_channel run.steps=200. Export the result with "
                 "`gemmalab export RUN_DIR --to gguf OUT`.",
    config="..config:QATConfig", run=".qat:train_qat", check="..config:check_qat_config",
    summary=lambda last, cfg: f"step {last['step']}: loss {last['loss']:.4f}{_evals(last)}; checkpoints "
                              f"in {cfg.run.out_dir}; export with: gemmalab export {cfg.run.out_dir} "
                              "--to gguf OUT.gguf"))
register(Recipe(
    "gkd", "on-policy distillation (GKD: JSD(beta), forward / reverse KL, Fenchel-Young alpha) from a "
           "teacher or a few-shot prompted teacher",
    _OVERRIDES + "gkd.lmbda=1 gkd.divergence=rkl run.steps=60.",
    config=".gkd:GKDConfig", run=".gkd:train_gkd", check=".gkd:check_gkd_config",
    summary=lambda last, cfg: f"step {last['step']}: loss {last['loss']:.4f}; checkpoints in "
                              f"{cfg.run.out_dir}"))
register(Recipe(
    "rm", "a Bradley-Terry reward model (scalar head on a Gemma 3 backbone; LoRA or top blocks); WARM "
          "members are runs of it merged with `gemmalab merge average`",
    _OVERRIDES + "optim.lr=4e-5 run.seed=1. Score with `gemmalab reward score RUN_DIR PAIRS.jsonl`.",
    config=".rm:RMConfig", run=".rm:train_rm", check=".rm:check_rm_config",
    summary=lambda last, cfg: f"step {last['step']}: loss {last['loss']:.4f}"
                              + "".join(f", {k} {last[k]:.4f}" for k in ("eval_accuracy", "eval_ece") if k in last)
                              + f"; checkpoints in {cfg.run.out_dir}"))
register(Recipe(
    "rl", "policy-gradient RL on verifiable rewards and reward models (RLOO, REINFORCE) with a KL to the "
          "reference",
    _OVERRIDES + "algo.name=rloo algo.beta=0.05 rollout.num_generations=4 run.steps=60.",
    config=".rl:RLConfig", run=".rl:train_rl", check=".rl:check_rl_config",
    summary=lambda last, cfg: f"step {last['step']}: reward {last.get('reward', float('nan')):.4f}, kl "
                              f"{last.get('kl', float('nan')):.4f}; checkpoints in {cfg.run.out_dir}"))
