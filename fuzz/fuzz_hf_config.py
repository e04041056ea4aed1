"""Fuzz config.json of a Hugging Face directory: bytes -> read_hf_config (the JSON reading and the
config_from_hf / multimodal_config_from_hf that read_hf_dir and gemmalab.load use), and has_vision.

Seeds: config.json files of the tiny presets in both transformers dialects (5.x `rope_parameters`,
4.5x `rope_theta` / `rope_scaling`), Gemma 2, and a Gemma3ForConditionalGeneration config shaped
like the hub's gemma-3-4b-it (nested text_config, vision_config).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Target, instrumented, main, write  # noqa: E402

with instrumented():
    from gemmalab.checkpoints.errors import CheckpointError
    from gemmalab.checkpoints.hf import config_to_hf, has_vision, read_hf_config
    from gemmalab.config import get_config


def one(data: bytes, scratch: Path) -> None:
    write(scratch, "config.json", data)
    vision = has_vision(scratch)  # never raises: a bool for any bytes
    assert isinstance(vision, bool)
    read_hf_config(scratch, vision=True)
    read_hf_config(scratch, vision=False)


def seeds(d: Path) -> list[bytes]:
    new = [config_to_hf(get_config(n)) for n in ("tiny", "tiny-27b-style", "tiny-gemma2")]
    old = dict(new[1], rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=6,
               rope_scaling={"rope_type": "linear", "factor": 8.0})
    del old["rope_parameters"], old["layer_types"]
    multimodal = {  # the shape of google/gemma-3-4b-it's config.json, with tiny sizes
        "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
        "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
        "mm_tokens_per_image": 16, "model_type": "gemma3",
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "model_type": "gemma3_text",
                        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "head_dim": 16, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 32, "image_size": 56, "intermediate_size": 64,
                          "model_type": "siglip_vision_model", "num_attention_heads": 2,
                          "num_hidden_layers": 1, "patch_size": 14, "vision_use_head": False}}
    return [json.dumps(c, indent=1).encode() for c in (*new, old, multimodal)]


if __name__ == "__main__":
    main(Target("hf_config", one, (CheckpointError,), seeds,
                notes="config.json bytes -> has_vision, read_hf_config(vision=True/False) "
                      "(read_json + config_from_hf + multimodal_config_from_hf)"))
