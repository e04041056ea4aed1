"""Model configuration: one frozen dataclass, named presets with the published numbers.

Numbers come from ../shared/spec/gemma3.md 1.1 (Gemma 3) and 1.7 (Gemma 2), which match the official
JAX reference (google-deepmind/gemma `_gemma.py`) and the transformers converter. Field names follow the
transformers config so that a reader can cross-check (`sliding_window`, `layer_types`, ...).
The multimodal models (spec 3) add the SigLIP vision config and a config joining it to a text one.
"""
from __future__ import annotations

import dataclasses
import math
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
    # Linear factor on the *local* layers. Gemma never scales them (a local layer sees offsets < W
    # only); != 1 exists solely to measure that pitfall (vLLM PR 29111), and is refused by export.
    rope_local_scaling_factor: float = 1.0
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



# ---- vision (spec 3) ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SiglipVisionConfig:
    """The SigLIP vision encoder of Gemma 3 (So400m/14 at 896 px; spec 3.1). Field names follow
    transformers' SiglipVisionConfig; Gemma 3 uses no pooling head (`vision_use_head=False`)."""
    name: str = "siglip-so400m-14-896"
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 896
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")

    @property
    def patches_per_side(self) -> int:  # 64 for 896 / 14
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:  # 4096
        return self.patches_per_side ** 2

    @property
    def head_dim(self) -> int:  # 72
        return self.hidden_size // self.num_attention_heads

    @property
    def num_parameters(self) -> int:
        """Patch conv + position table + blocks + final LayerNorm: 416.9M for So400m/14-896."""
        d, f = self.hidden_size, self.intermediate_size
        patch = self.num_channels * self.patch_size ** 2 * d + d
        block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d  # attn, mlp, 2 LayerNorms
        return patch + self.num_patches * d + self.num_hidden_layers * block + 2 * d


@dataclass(frozen=True)
class Gemma3MultimodalConfig:
    """Vision encoder + projector + text decoder (transformers' Gemma3Config). Each image becomes
    `mm_tokens_per_image` soft tokens: the encoder's patch grid average-pooled (4x4 for 64 -> 16 per
    side), RMS-normalised and projected to the text width (spec 3.2)."""
    name: str = "custom"
    text: Gemma3Config = field(default_factory=Gemma3Config)
    vision: SiglipVisionConfig = field(default_factory=SiglipVisionConfig)
    mm_tokens_per_image: int = 256
    boi_token_id: int = 255_999  # <start_of_image>
    eoi_token_id: int = 256_000  # <end_of_image>
    image_token_id: int = 262_144  # <image_soft_token>: a row of the 262,208-row table, or OOV (10.12)

    def __post_init__(self):
        side = math.isqrt(self.mm_tokens_per_image)
        if side * side != self.mm_tokens_per_image or self.vision.patches_per_side % side:
            raise ValueError(f"mm_tokens_per_image {self.mm_tokens_per_image} must be a square whose "
                             f"side divides the {self.vision.patches_per_side}-patch grid side")
        for name in ("boi_token_id", "eoi_token_id"):
            if not 0 <= getattr(self, name) < self.text.vocab_size:
                raise ValueError(f"{name} {getattr(self, name)} is outside the vocabulary "
                                 f"({self.text.vocab_size})")

    @property
    def tokens_per_side(self) -> int:  # 16
        return math.isqrt(self.mm_tokens_per_image)

    @property
    def pooling_kernel(self) -> int:  # 4: 64 x 64 patches -> 16 x 16 soft tokens
        return self.vision.patches_per_side // self.tokens_per_side

    @property
    def tokens_per_image(self) -> int:
        """Sequence positions one image takes: \\n\\n, <start_of_image>, soft tokens, <end_of_image>,
        \\n\\n (260 for Gemma 3)."""
        return self.mm_tokens_per_image + 4

    @property
    def projector_parameters(self) -> int:  # RMSNorm weight + the (vision d, text d) matrix
        return self.vision.hidden_size * (1 + self.text.hidden_size)

    def replace(self, **changes) -> "Gemma3MultimodalConfig":
        return dataclasses.replace(self, **changes)


SIGLIP_SO400M = SiglipVisionConfig()
TINY_SIGLIP = SiglipVisionConfig(name="tiny-siglip", hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, image_size=64,
                                 patch_size=4)  # 16 x 16 patches, pooled 4 x 4 like the real one

MULTIMODAL_PRESETS: dict[str, Gemma3MultimodalConfig] = {c.name: c for c in [
    Gemma3MultimodalConfig(name=f"gemma3-{size}", text=PRESETS[f"gemma3-{size}"], vision=SIGLIP_SO400M)
    for size in ("4b", "12b", "27b")] + [
    # Tiny configs for tests, 16 soft tokens per image. "tiny-vision": 512-token vocabulary, so the
    # image marker ids are small. "tiny-vision-262k": the real 262,208-row vocabulary and the real
    # ids, for end-to-end tests with the real tokenizer.
    Gemma3MultimodalConfig(name="tiny-vision", text=PRESETS["tiny"].replace(name="tiny-vision"),
                           vision=TINY_SIGLIP, mm_tokens_per_image=16, boi_token_id=500,
                           eoi_token_id=501, image_token_id=502),
    Gemma3MultimodalConfig(name="tiny-vision-262k",
                           text=PRESETS["tiny"].replace(name="tiny-vision-262k", vocab_size=262_208),
                           vision=TINY_SIGLIP, mm_tokens_per_image=16),
]}


def get_multimodal_config(name: str) -> Gemma3MultimodalConfig:
    """A multimodal preset ('gemma3-4b' or '4b', 'gemma3-12b', 'gemma3-27b', tiny ones for tests)."""
    key = name.lower()
    if key not in MULTIMODAL_PRESETS and f"gemma3-{key}" in MULTIMODAL_PRESETS:
        key = f"gemma3-{key}"
    if key not in MULTIMODAL_PRESETS:
        raise ValueError(f"unknown multimodal preset {name!r}; valid presets: "
                         f"{', '.join(MULTIMODAL_PRESETS)}")
    return MULTIMODAL_PRESETS[key]
