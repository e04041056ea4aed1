"""Training configuration: dataclasses filled from a TOML or YAML file plus `section.key=value` overrides.

Unknown sections or keys are errors that list the valid names, so a typo never silently trains with
a default.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Tables(list):
    """A config field holding a list of tables (TOML `[[section.key]]`, a YAML / JSON list of
    mappings), e.g. the reward terms of `gemmalab train rl`; the recipe checks each table's keys."""


class ConfigError(ValueError):
    """A training config that cannot be used as written."""


@dataclass
class ModelConfig:
    path: str | None = None  # GGUF or HF directory; None = the embedded 270M (unless preset is set)
    preset: str | None = None  # random init from a named preset (tests, from-scratch runs)
    tokenizer: str | None = None  # tokenizer source for a preset model (GGUF file or HF directory)
    arch: dict = field(default_factory=dict)  # Gemma3Config fields replacing the preset's (hidden_size, ...)
    dtype: str = "float32"  # parameter (master weight) dtype
    # "auto": bf16 autocast on GPU, and on CPUs with native bf16 (AVX512_BF16 / AMX-BF16, see
    # gemmalab.cpu.cpu_bf16; GEMMALAB_CPU_BF16=0|1 overrides), fp32 elsewhere; "bfloat16"; "none" (fp32)
    autocast: str = "auto"
    # the vocabulary-sized products of the chunked losses (logits, their gradients): "auto" = bf16
    # when autocast is bf16 (logits rounded to bf16, then every loss in fp32; see
    # gemmalab/train/losses/vocab.py), "float32" keeps them fp32 under autocast too
    vocab_products: str = "auto"
    activation_checkpointing: bool = False


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # JSONL / Parquet files, directories or globs
    seq_len: int = 1024
    batch_size: int = 8  # sequences per micro-batch
    shuffle_buffer: int = 10_000
    train_on: str = "model"  # "model": loss on model turns only; "all"


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # 0 disables
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclass
class LoraConfig:
    rank: int = 0  # 0 = full fine-tuning
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class RunConfig:
    out_dir: str = "runs/sft"
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    save_every: int = 200
    keep_checkpoints: int = 2
    device: str = "auto"  # "auto": cuda when available, else cpu
    threads: int = 0  # CPU threads; 0 = torch's default


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DistillSection:
    """What the student learns from. See gemmalab/train/recipes/distill.py and docs/distillation.md."""
    mode: str = "offline"  # "offline": targets from a teacher-logit store; "online": teacher in the loop
    store: str | None = None  # offline: the store directory (gemmalab distill cache)
    teacher: str | None = None  # online: GGUF / HF directory (None = the embedded 270M); offline: if set,
    #                             the store must have been made by this teacher
    loss: str = "sampled"  # "sampled" (Gemma 3), "topk", "full" (forward KL), "ce" (next token only)
    k: int = 256  # online: ids sampled (or top-k) per position; offline: the store's K
    temperature: float = 1.0  # online: teacher temperature (offline: fixed when the store was built)
    sampling: str = "with_replacement"  # online "sampled": "with_replacement" or "without_replacement"
    weighting: str = "renormalized"  # "renormalized" (Gemma 3) or "importance" (unbiased, counts / K)
    normalizer: str = "vocab"  # student log-softmax over the "vocab" or over the "sampled" set
    hard_weight: float = 0.0  # alpha in alpha * CE(next token) + (1 - alpha) * distillation


@dataclass
class EvalConfig:
    store: str | None = None  # held-out teacher-logit store; with --full-logprobs it gives the KL
    every: int = 0  # evaluate every N steps (and at the end); 0 = only at the end, if a store is set
    max_rows: int = 0  # rows of the store to evaluate on; 0 = all
    batch_size: int = 4


@dataclass
class DistillConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(train_on="all"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20))
    lora: LoraConfig = field(default_factory=LoraConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/distill"))
    distill: DistillSection = field(default_factory=DistillSection)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class QATSection:
    """The quantization trained on. See gemmalab/train/recipes/qat.py, gemmalab/quant/fake.py and docs/qat.md."""
    format: str = "q4_0"  # "q4_0" (int4, blocks of 32), "int4_channel" (int4, one scale per row), "sfp8"
    rounding: str = "ref"  # q4_0 / int4_channel: "ref" (ggml's, what llama-quantize and our export do)
    #                        or "rne" (ties to even); QAT should train on the grid it will be exported on
    sfp8_encoder: str = "production"  # sfp8: "production" (gemma.cpp's Compress) or "exact_rne"
    embedding: str = "q8_0"  # the embedding / tied LM head, frozen at "q8_0", "f16" or "f32"
    modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    train_norms: bool = True  # the RMSNorm gains train alongside the fake-quantized matrices
    tie_margin: float = 0.25  # q4_0 / int4_channel: weights on exact rounding ties start U(0, m) of a
    #                           step inside their cell (fq unchanged; see quant.fake.move_off_ties); 0: off


@dataclass
class QATConfig:
    """`gemmalab train qat`: distillation from the checkpoint's own probabilities into its
    fake-quantized copy (Gemma 3 report §2.3). The [distill] section picks the targets: online by
    default (full-vocabulary KD against the same checkpoint), or a teacher-logit store."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(train_on="all", seq_len=512, batch_size=1))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, betas=(0.9, 0.95),
                                                                   warmup_steps=10))
    lora: LoraConfig = field(default_factory=LoraConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/qat", save_every=50))
    qat: QATSection = field(default_factory=QATSection)
    distill: DistillSection = field(default_factory=lambda: DistillSection(mode="online", loss="full"))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Limits on what a config may hold: a real one is a few hundred bytes, a handful of tables deep. They
# keep a hostile file from costing memory or time (a YAML alias bomb expands exponentially when
# copied; deep nesting exhausts the parsers' recursion) before it is refused.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000
MAX_CONFIG_DEPTH = 32
SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def _one_line(text: object) -> str:
    """A library's error text as one line (PyYAML's and pyarrow's span several)."""
    return " ".join(str(text).split()) or "unknown error"


def _short(value: Any, n: int = 80) -> str:
    """repr(value), cut to about n characters, for error messages."""
    try:
        r = repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int past sys.get_int_max_str_digits
        r = f"<{type(value).__name__}>"
    return r if len(r) <= n else r[:n] + "..."


def _yaml_error(e: Exception) -> str:
    """PyYAML's multi-line "context / problem / mark" text as "problem (line L, column C)"."""
    problem = getattr(e, "problem", None)
    if not problem:
        return _one_line(e)
    context = getattr(e, "context", None)
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return _one_line(f"{context}: {problem}" if context else problem) + where


def _plain(raw: Any, where: str) -> dict:
    """`raw` as JSON-like nested dicts/lists (what the loaders accept), or ConfigError.

    Walks the parsed value without recursion, counting nodes, so a YAML alias bomb or a cycle
    (`&a [*a]`) is refused before anything copies it; the JSON round trip then refuses values no
    config has (dates, binary, ints beyond `sys.get_int_max_str_digits`).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a config must be a table of sections, not {type(raw).__name__}")
    stack, nodes = [(raw, 1)], 0
    while stack:
        obj, depth = stack.pop()
        nodes += 1
        if nodes > MAX_CONFIG_NODES:
            raise ConfigError(f"{where}: more than {MAX_CONFIG_NODES} values; not a training config")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{where}: nested more than {MAX_CONFIG_DEPTH} levels deep "
                              "(or a YAML alias refers to itself)")
        if isinstance(obj, dict):
            stack += [(v, depth + 1) for v in obj.values()]
        elif isinstance(obj, (list, tuple)):
            stack += [(v, depth + 1) for v in obj]
    try:
        return json.loads(json.dumps(raw, allow_nan=True))
    except (TypeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{where}: holds a value that is not a string, number, boolean, list or table "
                          f"({_one_line(e)})") from None


def read_config_file(path: str | Path) -> dict:
    """The file's nested dict. Every problem, parse errors included, is a one-line ConfigError
    naming the file (and the line, where the parser says)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such config file: {path}")
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"{path}: use a .toml, .yaml or .json config file")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes; a config file is at most {MAX_CONFIG_BYTES}")
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {_one_line(e)}") from None
    try:
        text = data.decode("utf-8")  # TOML, JSON (RFC 8259) and our YAML are UTF-8
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {_one_line(e)}") from None
        except ValueError as e:  # int() past sys.get_int_max_str_digits
            raise ConfigError(f"{path}: invalid TOML ({_one_line(e)})") from None
        except RecursionError:  # arrays / inline tables nested too deep for the parser
            raise ConfigError(f"{path}: invalid TOML (nested too deeply)") from None
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("YAML configs need PyYAML: pip install pyyaml (or use TOML)") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: {_yaml_error(e)}") from None
        except (ValueError, TypeError, OverflowError) as e:  # a timestamp like 2024-13-45, ...
            raise ConfigError(f"{path}: invalid YAML value ({_one_line(e)})") from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid YAML (nested too deeply)") from None
    else:
        try:
            raw = json.loads(text)
        except ValueError as e:  # JSONDecodeError says line and column
            raise ConfigError(f"{path}: invalid JSON: {_one_line(e)}") from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid JSON (nested too deeply)") from None
    return _plain(raw, str(path))


def _parse_value(text: str, item: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string
    except ValueError as e:  # an int past the digit limit
        raise ConfigError(f"override {_short(item)}: {_one_line(e)}") from None
    except RecursionError:
        raise ConfigError(f"override {_short(item)}: the value is nested too deeply") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`section.key=value` (value parsed as JSON when possible) onto a nested dict."""
    raw = _plain(raw, "config")
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"override {_short(item)} must be a string section.key=value")
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {_short(item)} must look like section.key=value")
        section, name = key.split(".", 1)
        table = raw.get(section)
        if table is None:
            table = raw[section] = {}
        elif not isinstance(table, dict):
            raise ConfigError(f"override {_short(item)}: [{section}] is {_short(table, 40)}, not a table of keys")
        table[name] = _parse_value(value, item)
    return _plain(raw, "config with overrides")


def build_config(raw: dict, cls=SFTConfig):
    """Fill the dataclasses, refusing unknown names and values of the wrong type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a table of sections, not {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(sections)
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown, key=str)}; valid: {sorted(sections)}")
    kwargs = {}
    for name, f in sections.items():
        default = f.default_factory()  # the recipe's defaults for this section
        sub_cls = default.__class__
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table of keys")
        valid = {g.name: g for g in dataclasses.fields(sub_cls)}
        bad = set(values) - set(valid)
        if bad:
            raise ConfigError(f"unknown key(s) {sorted(bad, key=str)} in [{name}]; valid: {sorted(valid)}")
        for key, value in values.items():
            _check_type(f"{name}.{key}", getattr(default, key), value)
        kwargs[name] = dataclasses.replace(default, **{
            k: _coerce(getattr(default, k), v) for k, v in values.items()})
    return cls(**kwargs)


def _coerce(default: Any, value: Any) -> Any:
    """A checked value in the field's own type: tuples stay tuples, 16.0 for an int field is 16."""
    if isinstance(default, tuple) and value is not None:
        return tuple(value)
    if isinstance(default, Tables):
        return Tables(dict(v) for v in value)
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
        return int(value)
    return value


def _check_type(name: str, default: Any, value: Any) -> None:
    if default is None:  # the optional fields are all paths or names: model.path, distill.store, ...
        if value is not None and not isinstance(value, (str, os.PathLike)):  # a Path from Python callers
            raise ConfigError(f"{name} must be a string, got {_short(value)}")
        return
    if value is None:  # null would reach arithmetic such as `distill.k < 1` as None
        raise ConfigError(f"{name} must be a {type(default).__name__}, not null (leave it out for the default)")
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
            ok = value.is_integer()
    elif isinstance(default, tuple):  # optim.betas: as many numbers as the default has
        ok = (isinstance(value, (list, tuple)) and len(value) == len(default)
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
        if not ok:
            raise ConfigError(f"{name} must be a list of {len(default)} numbers, got {_short(value)}")
    elif isinstance(default, Tables):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, dict) for v in value)
        if not ok:
            raise ConfigError(f"{name} must be a list of tables ([[{name}]] in TOML), got {_short(value)}")
    elif isinstance(default, list):  # data.train, lora.targets, qat.modules: names
        ok = isinstance(value, (list, tuple))
        if ok and not all(isinstance(v, (str, os.PathLike)) for v in value):
            raise ConfigError(f"{name} must be a list of strings, got {_short(value)}")
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{name} must be a {type(default).__name__}, got {_short(value)}")


def check_sft_config(cfg: SFTConfig) -> SFTConfig:
    if not cfg.data.train:
        raise ConfigError("data.train lists no training files")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> SFTConfig:
    raw = read_config_file(path) if path else {}
    return check_sft_config(build_config(apply_overrides(raw, list(overrides))))


def _one_of(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, valid))}, not {value!r}")


def check_distill_config(cfg: DistillConfig) -> DistillConfig:
    """Refuse combinations that cannot run, with the fix in the message."""
    d = cfg.distill
    _one_of("distill.mode", d.mode, ("offline", "online"))
    _one_of("distill.loss", d.loss, ("sampled", "topk", "full", "ce"))
    _one_of("distill.sampling", d.sampling, ("with_replacement", "without_replacement"))
    _one_of("distill.weighting", d.weighting, ("renormalized", "importance"))
    _one_of("distill.normalizer", d.normalizer, ("vocab", "sampled"))
    if not 0.0 <= d.hard_weight <= 1.0:
        raise ConfigError(f"distill.hard_weight must be in [0, 1], got {d.hard_weight}")
    if not d.temperature > 0:
        raise ConfigError(f"distill.temperature must be > 0, got {d.temperature}")
    if d.k < 1:
        raise ConfigError(f"distill.k must be >= 1, got {d.k}")
    if d.mode == "offline":
        if not d.store:
            raise ConfigError("distill.mode = 'offline' reads a teacher-logit store: set distill.store "
                              "(build one with `gemmalab distill cache`), or use distill.mode = 'online'")
        if cfg.data.train:
            raise ConfigError("offline distillation reads its rows from distill.store; data.train is for "
                              "distill.mode = 'online' (remove it)")
    else:
        if not cfg.data.train:
            raise ConfigError("online distillation runs the teacher on data.train: list the training files")
        if d.weighting == "importance" and d.sampling != "with_replacement":
            raise ConfigError("distill.weighting = 'importance' needs sampling with replacement")
    return cfg


def load_distill_config(path: str | Path | None, overrides: list[str] = ()) -> DistillConfig:
    raw = read_config_file(path) if path else {}
    return check_distill_config(build_config(apply_overrides(raw, list(overrides)), DistillConfig))


def check_qat_config(cfg: QATConfig) -> QATConfig:
    from ..quant.fake import EMBEDDING_FORMATS, FORMATS, PROJECTIONS, ROUNDINGS

    q = cfg.qat
    _one_of("qat.format", q.format, FORMATS)
    _one_of("qat.rounding", q.rounding, ROUNDINGS)
    _one_of("qat.sfp8_encoder", q.sfp8_encoder, ("production", "exact_rne"))
    _one_of("qat.embedding", q.embedding, EMBEDDING_FORMATS)
    bad = sorted(set(q.modules) - set(PROJECTIONS))
    if bad or not q.modules:
        raise ConfigError(f"qat.modules must name projections among {', '.join(PROJECTIONS)}, got {q.modules}")
    if not 0.0 <= q.tie_margin < 0.5:
        raise ConfigError(f"qat.tie_margin must be in [0, 0.5), got {q.tie_margin}")
    if cfg.lora.rank:
        raise ConfigError("QAT trains the quantized matrices themselves: set lora.rank = 0")
    if cfg.model.preset:
        raise ConfigError("QAT quantizes a trained checkpoint: set model.path (a GGUF file or HF "
                          "directory; unset = the embedded 270M), not model.preset")
    if cfg.distill.teacher is None and cfg.distill.mode == "online":
        # the targets are the probabilities of the same, non-quantized checkpoint
        cfg.distill.teacher = cfg.model.path
    return check_distill_config(cfg)


def load_qat_config(path: str | Path | None, overrides: list[str] = ()) -> QATConfig:
    raw = read_config_file(path) if path else {}
    return check_qat_config(build_config(apply_overrides(raw, list(overrides)), QATConfig))
