"""Model configuration: one frozen dataclass, named presets with the published numbers.

Numbers come from ../shared/spec/gemma3.md 1.1 (Gemma 3) and 1.7 (Gemma 2), which match the official
JAX reference (google-deepmind/gemma `_gemma.py`) and the transformers converter. Field names follow the
transformers config so that a reader can cross-check (`sliding_window`, `layer_types`, ...).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SLIDING = "sliding_attention"  # local layer: a query sees exactly W keys, itself included (q - W < k <= q)
FULL = "full_attention"  # global layer: plain causal attention over the whole context


def layer_pattern(num_layers: int, period: int) -> tuple[str, ...]:
    """(LOCAL x (period-1), GLOBAL) repeated and truncated: the first layer is local, a remainder is local."""
    return tuple(FULL if (i + 1) % period == 0 else SLIDING for i in range(num_layers))


@dataclass(frozen=True)
class Gemma3Config:
    name: str = "custom"
    family: str = "gemma3"  # "gemma3" or "gemma2": the same decoder code runs both
    vocab_size: int = 262_144
    hidden_size: int = 640
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256
    intermediate_size: int = 2048
    layer_types: tuple[str, ...] = field(default_factory=lambda: layer_pattern(18, 6))
    sliding_window: int = 512
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_base_freq: float = 10_000.0  # local layers
    rope_scaling_factor: float = 1.0  # linear (position-interpolation) factor, global layers only
    query_pre_attn_scalar: int = 256  # scores are multiplied by query_pre_attn_scalar ** -0.5
    max_position_embeddings: int = 32_768
    rms_norm_eps: float = 1e-6
    use_qk_norm: bool = True  # Gemma 3 replaced Gemma 2's soft-capping by QK-norm
    attn_logit_softcapping: float | None = None  # Gemma 2: 50.0
    final_logit_softcapping: float | None = None  # Gemma 2: 30.0
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2

    def __post_init__(self):
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")
        bad = set(self.layer_types) - {SLIDING, FULL}
        if bad:
            raise ValueError(f"unknown layer types {sorted(bad)}; use {SLIDING!r} or {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.family not in ("gemma3", "gemma2"):
            raise ValueError(f"unknown family {self.family!r}; use 'gemma3' or 'gemma2'")

    # ---- derived values -------------------------------------------------------------------------
    @property
    def num_global_layers(self) -> int:
        return self.layer_types.count(FULL)

    @property
    def num_local_layers(self) -> int:
        return self.layer_types.count(SLIDING)

    @property
    def q_dim(self) -> int:  # heads * head_dim, which is not hidden_size for Gemma 3
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def non_embedding_parameters(self) -> int:
        d = self.hidden_size
        attn = d * self.q_dim * 2 + d * self.kv_dim * 2
        mlp = 3 * d * self.intermediate_size
        norms = 4 * d + (2 * self.head_dim if self.use_qk_norm else 0)
        return self.num_hidden_layers * (attn + mlp + norms) + d

    def kv_cache_bytes(self, context: int, bytes_per_element: int = 2, hybrid: bool = True) -> int:
        """Spec 7.2: 2 (K,V) * n_kv * head_dim * bytes, times (n_global*T + n_local*min(W, T))."""
        per_token_layer = 2 * self.num_key_value_heads * self.head_dim * bytes_per_element
        if not hybrid:
            return per_token_layer * self.num_hidden_layers * context
        return per_token_layer * (self.num_global_layers * context +
                                  self.num_local_layers * min(self.sliding_window, context))

    def replace(self, **changes) -> "Gemma3Config":
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            period = 2 if self.family == "gemma2" else 6
            changes["layer_types"] = layer_pattern(changes["num_hidden_layers"], period)
        return dataclasses.replace(self, **changes)


def _gemma3(name, layers, d, heads, kv_heads, ff, *, head_dim=256, window=1024, rope_scale=8.0,
            qscalar=256, ctx=131_072) -> Gemma3Config:
    return Gemma3Config(
        name=name, family="gemma3", hidden_size=d, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=ff, layer_types=layer_pattern(layers, 6), sliding_window=window,
        rope_scaling_factor=rope_scale, query_pre_attn_scalar=qscalar, max_position_embeddings=ctx)


def _gemma2(name, layers, d, heads, kv_heads, ff, *, head_dim=256, qscalar=256) -> Gemma3Config:
    return Gemma3Config(
        name=name, family="gemma2", vocab_size=256_000, hidden_size=d, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=ff, layer_types=layer_pattern(layers, 2), sliding_window=4096,
        rope_theta=10_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=qscalar,
        max_position_embeddings=8192, use_qk_norm=False, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0)


PRESETS: dict[str, Gemma3Config] = {c.name: c for c in [
    _gemma3("gemma3-270m", 18, 640, 4, 1, 2048, window=512, rope_scale=1.0, ctx=32_768),
    _gemma3("gemma3-1b", 26, 1152, 4, 1, 6912, window=512, rope_scale=1.0, ctx=32_768),
    _gemma3("gemma3-4b", 34, 2560, 8, 4, 10240).replace(vocab_size=262_208),
    _gemma3("gemma3-12b", 48, 3840, 16, 8, 15360).replace(vocab_size=262_208),
    # 27B scales queries by (d_model / heads)^-1/2 = 168^-1/2, not head_dim^-1/2 (JAX
    # QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS; llama.cpp does the same).
    _gemma3("gemma3-27b", 62, 5376, 32, 16, 21504, head_dim=128, qscalar=168).replace(
        vocab_size=262_208),
    _gemma2("gemma2-2b", 26, 2304, 8, 4, 9216),
    _gemma2("gemma2-9b", 42, 3584, 16, 8, 14336),
    _gemma2("gemma2-27b", 46, 4608, 32, 16, 36864, head_dim=128, qscalar=144),
    # Tiny configs for tests: 8 layers so that both a global layer (index 5) and trailing local
    # layers exist; a window of 8 so that sequences several windows long stay cheap.
    _gemma3("tiny", 8, 64, 4, 2, 128, head_dim=16, window=8, rope_scale=1.0, ctx=512).replace(
        vocab_size=512),
    _gemma3("tiny-27b-style", 8, 64, 4, 2, 128, head_dim=16, window=8, rope_scale=8.0,
            qscalar=24, ctx=512).replace(vocab_size=512),
    _gemma2("tiny-gemma2", 6, 64, 4, 2, 128, head_dim=16).replace(
        vocab_size=512, sliding_window=8, max_position_embeddings=512),
]}


def get_config(name: str) -> Gemma3Config:
    """A preset by name ('gemma3-270m' or its short form '270m'); ValueError lists the valid names."""
    key = name.lower()
    if key not in PRESETS and f"gemma3-{key}" in PRESETS:
        key = f"gemma3-{key}"
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[key]

