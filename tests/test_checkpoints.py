"""Hugging Face directories and GGUF files: name mapping, config dialects, clear errors."""
import json

import gguf
import numpy as np
import pytest
import torch
import transformers

from gemmalab.checkpoints import CheckpointError
from gemmalab.checkpoints import gguf as gguf_ckpt
from gemmalab.checkpoints.hf import config_from_hf, read_hf_dir
from gemmalab.config import get_config
from gemmalab.lm import build_model

from .hf_reference import hf_model


def our_logits(path, ids):
    config, tensors = read_hf_dir(path)
    model = build_model(config, tensors, torch.float32, torch.device("cpu"), path)
    with torch.no_grad():
        return model(ids), config


@pytest.mark.parametrize("name", ["tiny", "tiny-27b-style", "tiny-gemma2"])
def test_causal_lm_directory(tmp_path, name):
    ref = hf_model(get_config(name))
    ref.save_pretrained(tmp_path)
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(0))
    logits, config = our_logits(tmp_path, ids)
    assert config.replace(name=name) == get_config(name)
    with torch.no_grad():
        assert (logits - ref(ids).logits).abs().max() <= 1e-4


def test_sharded_directory(tmp_path):
    ref = hf_model(get_config("tiny"))
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = torch.arange(40)[None]
    logits, _ = our_logits(tmp_path, ids)
    with torch.no_grad():
        assert (logits - ref(ids).logits).abs().max() <= 1e-4
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        read_hf_dir(tmp_path)


def test_conditional_generation_text_part(tmp_path):
    """Gemma3ForConditionalGeneration: the `language_model.` names of the text part, vision skipped."""
    text = hf_model(get_config("tiny-27b-style")).config
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                    mm_tokens_per_image=4)
    torch.manual_seed(0)
    ref = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.5)
    ref.save_pretrained(tmp_path)
    ids = torch.randint(0, 500, (1, 30), generator=torch.Generator().manual_seed(1))
    logits, config = our_logits(tmp_path, ids)
    assert config.rope_scaling_factor == 8.0 and config.query_pre_attn_scalar == 24
    with torch.no_grad():
        assert (logits - ref(input_ids=ids).logits).abs().max() <= 1e-4


def test_transformers_4_5x_config_dialect():
    new = {"model_type": "gemma3_text", "num_hidden_layers": 8, "hidden_size": 64,
           "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "vocab_size": 512, "sliding_window": 8,
           "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                  "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    old = dict(new, rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=6,
               rope_scaling={"rope_type": "linear", "factor": 8.0})
    del old["rope_parameters"]
    a, b = config_from_hf(new), config_from_hf(old)
    assert a == b and a.rope_scaling_factor == 8.0 and a.rope_local_base_freq == 1e4
    nested = {"model_type": "gemma3", "text_config": old}  # multimodal configs nest the text part
    assert config_from_hf(nested) == a


def test_bad_directories(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        read_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="llama"):
        read_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid"):
        read_hf_dir(tmp_path)


# ---- GGUF -----------------------------------------------------------------------------------------

def write_gguf(path, arch="gemma3", tensors=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    for name, (data, raw_dtype) in (tensors or {}).items():
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_errors(tmp_path, model_path):
    with pytest.raises(CheckpointError, match="no such file"):
        gguf_ckpt.open_gguf(tmp_path / "missing.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("hello, I am not a model")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        gguf_ckpt.open_gguf(text)
    cut = tmp_path / "cut.gguf"
    with open(model_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(50_000_000))
    with pytest.raises(CheckpointError, match="truncated"):
        gguf_ckpt.open_gguf(cut)
    header_cut = tmp_path / "header_cut.gguf"
    with open(model_path, "rb") as src, open(header_cut, "wb") as dst:
        dst.write(src.read(100_000))  # ends inside the token list
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        gguf_ckpt.open_gguf(header_cut)
    llama = tmp_path / "llama.gguf"
    write_gguf(llama, "llama", {"token_embd.weight": (np.zeros((4, 8), np.float32), None)})
    with pytest.raises(CheckpointError, match="'llama' model"):
        gguf_ckpt.open_gguf(llama)


def test_gguf_unsupported_tensor_type(tmp_path):
    path = tmp_path / "iq.gguf"
    raw = np.zeros((4, 66), np.uint8)  # IQ2_XXS: 66 bytes per 256 weights
    write_gguf(path, "gemma3", {"blk.0.attn_q.weight": (raw, gguf.GGMLQuantizationType.IQ2_XXS)})
    reader = gguf_ckpt.open_gguf(path)
    with pytest.raises(CheckpointError, match="IQ2_XXS"):
        gguf_ckpt.read_tensors(reader, path)
    with pytest.raises(CheckpointError, match="lacks GGUF metadata gemma3.embedding_length"):
        gguf_ckpt.config_from_gguf(reader)


def test_gguf_norms_hold_the_plus_one(model_path):
    """llama.cpp's converter stores 1 + w; we hold w (the gain stays (1 + w), added once)."""
    reader = gguf_ckpt.open_gguf(model_path)
    raw = gguf.GGUFReader(model_path)
    stored = {t.name: np.asarray(t.data) for t in raw.tensors if t.name.endswith("norm.weight")}
    ours = gguf_ckpt.read_tensors(reader, model_path)
    for name, value in stored.items():
        mine = ours[gguf_ckpt.gguf_to_ours(name)]
        assert torch.allclose(mine + 1.0, torch.from_numpy(value.copy()), atol=1e-6), name
    assert "lm_head.weight" not in ours  # tied to the embedding
