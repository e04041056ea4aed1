"""transformers references for the vision tests: Gemma3ForConditionalGeneration on random weights built
from our multimodal config, the real Gemma 3 tokenizer with <image_soft_token>, Gemma3Processor."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from gemmalab.checkpoints.hf import config_to_hf


def hf_config(mm) -> transformers.Gemma3Config:
    text = config_to_hf(mm.text)
    text.pop("architectures")
    v = mm.vision
    vision = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                  image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps,
                  vision_use_head=False)
    return transformers.Gemma3Config(text_config=text, vision_config=vision,
                                     mm_tokens_per_image=mm.mm_tokens_per_image,
                                     boi_token_index=mm.boi_token_id, eoi_token_index=mm.eoi_token_id,
                                     image_token_index=mm.image_token_id)


def hf_multimodal(mm, seed: int = 0) -> transformers.Gemma3ForConditionalGeneration:
    """Random weights; norm weights and the (zero-initialised) projector randomised as well."""
    torch.manual_seed(seed)
    ref = transformers.Gemma3ForConditionalGeneration(hf_config(mm))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or "mm_input_projection" in name:
                p.normal_(0.0, 0.5)
    return ref.eval()


def token_type_ids(ids: torch.Tensor, mm) -> torch.Tensor:
    """What Gemma3Processor returns: 1 on the soft-token placeholders (turns on the bidirectional
    image attention in transformers)."""
    return (ids == mm.image_token_id).long()


def write_gemma3_tokenizer(folder: Path, gguf_path: Path) -> None:
    """The real Gemma 3 tokenizer (from the embedded 270M GGUF) plus <image_soft_token> = 262144, as
    the multimodal checkpoints on the hub have it: tokenizer.model/.json and tokenizer_config.json
    naming the image tokens (which GemmaTokenizer exposes as boi_token/image_token/eoi_token)."""
    from gemmalab.checkpoints.export import _write_tokenizer_files
    from gemmalab.config import get_multimodal_config
    from gemmalab.tokenizer import CONTROL, Tokenizer

    base = Tokenizer.from_gguf(gguf_path)
    tok = Tokenizer._from_vocab(base._pieces + ["<image_soft_token>"], list(base._types) + [CONTROL],
                                bos_id=base.bos_id, eos_id=base.eos_id, pad_id=base.pad_id,
                                unk_id=base.unk_id, source="gemma3+image")
    folder.mkdir(parents=True, exist_ok=True)
    _write_tokenizer_files(folder, tok, get_multimodal_config("4b").text)
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    added = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    # like the hub file: every added token listed (transformers takes this list as the whole set)
    cfg.update(boi_token="<start_of_image>", eoi_token="<end_of_image>",
               image_token="<image_soft_token>",
               added_tokens_decoder={str(a["id"]): {k: v for k, v in a.items() if k != "id"}
                                     for a in added})
    cfg_file.write_text(json.dumps(cfg))


def hf_processor(tokenizer_dir: Path, mm) -> transformers.Gemma3Processor:
    """Gemma3Processor as the hub preprocessor_config.json sets it up, at the model's image size."""
    from gemmalab.tokenizer import CHAT_TEMPLATE

    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return transformers.Gemma3Processor(image_processor=hf_image_processor(mm.vision.image_size),
                                        tokenizer=tok, chat_template=CHAT_TEMPLATE,
                                        image_seq_length=mm.mm_tokens_per_image)


def hf_image_processor(size: int = 896, **kwargs):
    """The hub preprocessor_config.json of google/gemma-3-4b-it (resample 2 = bilinear), on the PIL
    backend that config was written for (with torchvision installed, `Gemma3ImageProcessor` would
    pick a torchvision backend that resizes differently)."""
    return transformers.Gemma3ImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        resample=2, rescale_factor=1 / 255, do_resize=True, do_rescale=True, do_normalize=True,
        do_convert_rgb=True, **kwargs)
