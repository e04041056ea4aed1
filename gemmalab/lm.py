"""`gemmalab.load()` and the LM object: a model, its tokenizer, and generation in one handle."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .checkpoints import CheckpointError, checkpoint_kind
from .config import Gemma3Config, Gemma3MultimodalConfig
from .generate import (BatchGenerator, GenerationResult, PromptTooLongError, SamplingParams,
                       TextStream, check_prompts, chunk_bounds, generate_steps)
from .images import ImageInput, PanAndScan
from .model import Gemma3, Gemma3Multimodal

Prompt = str | Sequence[int]
Images = ImageInput | Sequence[ImageInput] | None


def load(path: str | Path | None = None, *, mode: str = "auto", dtype: torch.dtype | None = None,
         device: str | torch.device = "cpu", rope_scaling_factor: float | None = None,
         max_context: int | None = None, rope_local_scaling_factor: float | None = None) -> "LM":
    """Load a GGUF file or a Hugging Face directory; no path loads the embedded Gemma 3 270M.

    mode: "auto" (default) picks the fastest mode that meets the quality bar: "native" on a CPU
    with AVX2/FMA/F16C, "fp32" elsewhere (and for multimodal checkpoints). "fp32" dequantizes every
    weight (the exact reference path; bf16 on GPU unless `dtype` says otherwise). "native" computes
    on the file's own quantized blocks (float checkpoints are quantized to Q8_0); "q8" puts every
    matrix in Q8_0; an SFP8 directory (`gemmalab export --to hf --dtype sfp8`) loads as "sfp8"
    (1-byte weights decoded on the fly) or "fp32". docs/benchmarks.md has the speed and quality of
    each mode. fp16 is refused:
    Gemma 3 activations overflow it (spec 10.1).

    Long-context overrides (docs/eval.md): `rope_scaling_factor` replaces the checkpoint's linear
    RoPE factor (positional interpolation, Chen et al. 2023) on the global layers only, as Gemma 3
    did to reach 128K; `max_context` replaces the context length (positions beyond the trained one
    are allowed, as llama.cpp allows them). `rope_local_scaling_factor` scales the local layers too:
    a deliberate misconfiguration, for measuring that pitfall only.
    """
    from ._paths import default_model_path
    from .checkpoints import gguf as gguf_ckpt
    from .checkpoints import hf as hf_ckpt
    from .quant import kernels
    from .quant.model import BLOCK_TYPES, MODES, build_quantized
    from .tokenizer import Tokenizer

    t0 = time.perf_counter()
    device = torch.device(device)
    if path is not None and Path(path).expanduser().is_dir():
        from .checkpoints.sfp8 import is_sfp8_dir, load_sfp8
        if is_sfp8_dir(Path(path).expanduser()):  # `gemmalab export --to hf --dtype sfp8`
            if rope_scaling_factor or max_context or rope_local_scaling_factor:
                raise ValueError("RoPE / context overrides are not supported for SFP8 checkpoints")
            mode = "sfp8" if mode == "auto" else mode
            if mode not in ("sfp8", "fp32"):
                raise ValueError(f"an SFP8 checkpoint loads with mode 'sfp8' (weights decoded on the "
                                 f"fly, 1 byte each at rest) or 'fp32', not {mode!r}")
            model, tokenizer = load_sfp8(Path(path).expanduser(), mode=mode, device=device)
            return LM(model, tokenizer, path=Path(path), load_seconds=time.perf_counter() - t0, mode=mode)
    if mode not in ("auto",) + MODES:
        raise ValueError(f"unknown mode {mode!r}; use auto, {', '.join(MODES)}")
    auto = mode == "auto"
    if auto:
        mode = "native" if device.type == "cpu" and kernels.available() else "fp32"
    elif mode != "fp32":
        if device.type != "cpu":
            raise ValueError(f"mode {mode!r} runs on the CPU kernels; use mode='fp32' on {device}")
        kernels.load()  # raises KernelsUnavailable with the reason
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    if dtype == torch.float16:
        raise ValueError("fp16 is not supported: Gemma 3 activations overflow it; use bf16 or fp32")
    if mode != "fp32" and dtype != torch.float32:
        raise ValueError(f"mode {mode!r} computes in float32; leave dtype unset")
    path = Path(path).expanduser() if path is not None else default_model_path()
    blocks: dict = {}
    if checkpoint_kind(path) == "hf":
        config, tensors = hf_ckpt.read_hf_dir(path, vision=True)
        tokenizer = Tokenizer.from_hf_dir(path)
        if isinstance(config, Gemma3MultimodalConfig) and mode != "fp32":
            if not auto:
                raise ValueError(f"mode {mode!r} runs text-only models; load multimodal checkpoints "
                                 "with mode='fp32'")
            mode = "fp32"
    else:
        reader = gguf_ckpt.open_gguf(path)
        config = gguf_ckpt.config_from_gguf(reader, name=path.stem)
        tokenizer = Tokenizer.from_gguf(reader)
        if mode == "fp32":
            tensors = gguf_ckpt.read_tensors(reader, path, dtype=dtype)
        else:
            blocks, tensors = gguf_ckpt.read_blocks(reader, path, BLOCK_TYPES)
        del reader  # unmaps the file
    config = _override_rope(config, rope_scaling_factor, max_context, rope_local_scaling_factor)
    if mode == "fp32":
        model = build_model(config, tensors, dtype, device, source=path)
    else:
        try:
            model = build_quantized(config, blocks, tensors, mode)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from None
    return LM(model, tokenizer, path=path, load_seconds=time.perf_counter() - t0, mode=mode)


def _override_rope(config, factor, max_context, local_factor):
    changes = {}
    for key, value in (("rope_scaling_factor", factor), ("rope_local_scaling_factor", local_factor)):
        if value is not None:
            if not (isinstance(value, (int, float)) and 0 < value <= 1024):
                raise ValueError(f"{key} must be a number in (0, 1024], got {value!r}")
            changes[key] = float(value)
    if max_context is not None:
        if not (isinstance(max_context, int) and max_context > 0):
            raise ValueError(f"max_context must be a positive integer, got {max_context!r}")
        changes["max_position_embeddings"] = max_context
    if not changes:
        return config
    if isinstance(config, Gemma3MultimodalConfig):
        return dataclasses.replace(config, text=config.text.replace(**changes))
    return config.replace(**changes)


def build_model(config: Gemma3Config | Gemma3MultimodalConfig, tensors: dict[str, torch.Tensor],
                dtype: torch.dtype, device: torch.device, source: Path | str = ""
                ) -> Gemma3 | Gemma3Multimodal:
    """Build on the meta device and assign the checkpoint tensors (no random init, no extra copy)."""
    with torch.device("meta"):
        model = (Gemma3Multimodal if isinstance(config, Gemma3MultimodalConfig) else Gemma3)(config)
    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    state = {}
    for name, want in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the config "
                                  f"implies {tuple(want.shape)}")
        state[name] = t.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


class LM:
    """A loaded model with its tokenizer. `lm.generate`, `lm.stream`, `lm.chat`, `lm.logits`.

    `lm.model` is the text decoder. A multimodal checkpoint also gives `lm.multimodal` (the
    Gemma3Multimodal holding the vision encoder, the projector and `lm.model`; None otherwise), and
    then `generate`, `stream`, `chat` and `logits` take images (see `generate`).
    """

    def __init__(self, model: Gemma3 | Gemma3Multimodal, tokenizer, path: Path | None = None,
                 load_seconds: float = 0.0, mode: str = "fp32"):
        self.multimodal = model if isinstance(model, Gemma3Multimodal) else None
        self.model = model.language_model if self.multimodal is not None else model
        self.tokenizer, self.path = tokenizer, path
        self.load_seconds, self.mode = load_seconds, mode

    @property
    def config(self) -> Gemma3Config:
        return self.model.config

    def _ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=True)
        ids = [int(i) for i in prompt]
        vocab = self.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        return ids

    def _params(self, temperature, top_k, top_p, seed) -> SamplingParams:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

    def generate(self, prompt: Prompt | list[Prompt], max_new_tokens: int = 128, *,
                 temperature: float = 1.0, top_k: int = 64, top_p: float = 0.95,
                 seed: int | None = None, stop: Sequence[str] = (),
                 stop_ids: Sequence[int] | None = None, images: Images = None,
                 pan_and_scan: bool | PanAndScan = False, lookup: int = 0
                 ) -> GenerationResult | list[GenerationResult]:
        """Continue a prompt (text or ids); a list of prompts runs as one batch and returns a list.

        temperature=0 is greedy. Generation ends at <eos> / <end_of_turn> (or `stop_ids`), at any of
        the `stop` strings (cut from the text), or after max_new_tokens. lookup=K drafts up to K
        tokens per step by prompt lookup (one text prompt; the same output, fewer model passes when
        the answer repeats its context; acceptance counts in `.stats`).

        images (multimodal models): paths, PIL images or numpy arrays, one per `<start_of_image>`
        marker in the prompt, in order (a prompt without markers gets its images at the start);
        for a batch, one list per prompt. Each image takes 260 positions (256 soft tokens), plus
        260 per crop with `pan_and_scan=True` (or a PanAndScan with other settings).
        """
        batched = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
        prompts = prompt if batched else [prompt]
        per_prompt = self._images_per_prompt(images, len(prompts), batched)
        results = self._generate(prompts, max_new_tokens, self._params(temperature, top_k, top_p,
                                                                       seed), stop, stop_ids,
                                 per_prompt, pan_and_scan, lookup)
        return results if batched else results[0]

    def _generate(self, prompts, max_new_tokens, params, stop, stop_ids, images=None,
                  pan_and_scan=False, lookup=0) -> list[GenerationResult]:
        """prompts: text or ids (see `generate`); images: None or one list per prompt."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        stop_ids = tuple(self.tokenizer.stop_ids if stop_ids is None else stop_ids)
        n = len(prompts)
        new: list[list[int]] = [[] for _ in range(n)]
        texts, reason = [""] * n, ["length"] * n
        stats: dict = {}
        prompts, vision = self._with_images(prompts, images, pan_and_scan)
        if max_new_tokens:
            for b, token, piece, finish in self._events(prompts, vision, max_new_tokens, params,
                                                        stop, stop_ids, stats, lookup):
                if token is not None:
                    new[b].append(token)
                texts[b] += piece
                if finish is not None:
                    reason[b] = finish
        return [GenerationResult(texts[b], new[b], reason[b], len(prompts[b]), stats)
                for b in range(n)]

    def _events(self, prompts: list[list[int]], vision: dict, max_new_tokens: int,
                params: SamplingParams, stop: Sequence[str], stop_ids: tuple[int, ...],
                stats: dict | None, lookup: int
                ) -> Iterator[tuple[int, int | None, str, str | None]]:
        """(prompt index, token or None, new text, finish reason or None) as generation goes.

        The batch core (generate.BatchGenerator) runs every prompt in its own row, prefilled
        first, then decoding together; each row samples with its own generator seeded
        `params.seed`, so a prompt in a batch gives what it gives alone (bit for bit on the fused
        quantized step; the fp32 module path decodes the batch in one forward, exact=False, whose
        last bits may depend on the batch, as they did before the core).
        Prompt lookup (one prompt, speculative) keeps its own loop (generate.lookup_steps): it
        writes several tokens of a row per step and rolls rejected ones back; the text logic is
        the same TextStream."""
        if lookup:
            text = TextStream(self.tokenizer, stop, stop_ids)
            for tokens, _ in generate_steps(self.model, prompts, max_new_tokens, params, stop_ids,
                                            self.config.pad_token_id, stats=stats, lookup=lookup,
                                            **vision):
                tok = int(tokens[0])
                piece, stopped = text.push(tok)
                yield 0, tok, piece, "stop" if stopped else None
                if stopped:
                    return
            yield 0, None, text.flush(), "length"
            return
        context = self.config.max_position_embeddings
        check_prompts(prompts, context)
        gen = BatchGenerator(self.model, self.tokenizer, len(prompts),
                             min(context, max(len(p) for p in prompts) + max_new_tokens),
                             exact=False)
        for b, p in enumerate(prompts):
            images = {}
            if vision:
                images = dict(inputs_embeds=vision["inputs_embeds"][b],
                              image_groups=vision["image_groups"][b])
            gen.admit(p, params, max_tokens=max_new_tokens, stop=stop, stop_ids=stop_ids, tag=b,
                      **images)
        t0 = time.perf_counter()
        new_tokens = 0
        while gen.prefilling:
            for ev in gen.prefill_step():
                new_tokens += ev.token is not None
                yield ev.group.tag, ev.token, ev.text, ev.finish_reason
        t1 = time.perf_counter()
        while gen.running:
            for ev in gen.decode():
                new_tokens += ev.token is not None
                yield ev.group.tag, ev.token, ev.text, ev.finish_reason
        if stats is not None:
            t2 = time.perf_counter()
            first = min(new_tokens, len(prompts))  # sampled from the prefill's logits
            stats.update(prompt_tokens=sum(len(p) for p in prompts), prefill_s=t1 - t0,
                         decode_s=t2 - t1, new_tokens=new_tokens,
                         decode_tok_s=(new_tokens - first) / (t2 - t1) if new_tokens > first else 0.0)

    def stream(self, prompt: Prompt, max_new_tokens: int = 128, *, temperature: float = 1.0,
               top_k: int = 64, top_p: float = 0.95, seed: int | None = None,
               stop: Sequence[str] = (), stats: dict | None = None, images: Images = None,
               pan_and_scan: bool | PanAndScan = False, lookup: int = 0) -> Iterator[str]:
        """Yield text as it is generated; pieces never split a UTF-8 character or a stop string.
        `images`, `pan_and_scan` and `lookup` as in `generate`."""
        params = self._params(temperature, top_k, top_p, seed)
        prompts, vision = self._with_images([prompt], self._images_per_prompt(images, 1, False),
                                            pan_and_scan)
        if max_new_tokens <= 0:
            check_prompts(prompts, self.config.max_position_embeddings)
            return
        for _, _, piece, _ in self._events(prompts, vision, max_new_tokens, params, stop,
                                           tuple(self.tokenizer.stop_ids), stats, lookup):
            if piece:
                yield piece

    def chat(self, messages: list[dict], max_new_tokens: int = 256, *, images: Images = None,
             **kwargs) -> GenerationResult:
        """Answer a conversation formatted with the Gemma 3 chat template.

        Content items `{"type": "image", "image": X}` (X a path, PIL image or array; "path" also
        works) put an image in a turn; items `{"type": "image"}` take the next of `images`.
        """
        found = self._chat_images(messages, images)
        if not found:
            return self.generate(self.tokenizer.encode_chat(messages), max_new_tokens, **kwargs)
        return self.generate(self.chat_prompt(messages), max_new_tokens, images=found, **kwargs)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template's text without the leading <bos> (which `generate` adds): a prompt for
        `generate` / `stream` that keeps the conversation's <start_of_image> markers."""
        from .tokenizer import render_chat
        return render_chat(messages, add_generation_prompt)

    @torch.inference_mode()
    def logits(self, ids: Prompt, chunk_size: int = 512, *, images: Images = None,
               pan_and_scan: bool | PanAndScan = False) -> torch.Tensor:
        """Next-token logits (T, V) in fp32 for every position of one sequence (with its images'
        placeholder positions, see `generate`)."""
        (ids,), vision = self._with_images([ids], self._images_per_prompt(images, 1, False),
                                           pan_and_scan)
        if len(ids) > self.config.max_position_embeddings:
            raise ValueError(f"{len(ids)} tokens exceed the model context "
                             f"{self.config.max_position_embeddings}")
        x = torch.tensor([ids], device=self.model.device)
        cache = self.model.make_cache(1, len(ids))
        embeds = groups = None
        if vision:
            embeds, groups = vision["inputs_embeds"][0][None], vision["image_groups"][0][None]
        out = []
        for s, e in chunk_bounds(len(ids), chunk_size, groups):
            extra = {} if embeds is None else dict(inputs_embeds=embeds[:, s:e],
                                                   image_groups=groups[:, s:e])
            out.append(self.model(x[:, s:e], cache=cache, **extra)[0].float())
        return torch.cat(out, 0)

    # ---- images ----------------------------------------------------------------------------------

    def _images_per_prompt(self, images: Images, n_prompts: int, batched: bool) -> list[list] | None:
        """One list of images per prompt, or None when no prompt has images."""
        import numpy as np

        if images is None:
            return None
        single = isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "getbands")
        if batched:
            if single or len(images) != n_prompts or any(
                    not isinstance(x, (list, tuple)) for x in images):
                raise ValueError("with a batch of prompts, give images as one list per prompt "
                                 "(an empty list for a prompt without images)")
            per_prompt = [list(x) for x in images]
        else:
            per_prompt = [[images] if single else list(images)]
        if not any(per_prompt):
            return None
        if self.multimodal is None:
            raise ValueError(f"{self.path.name if self.path else 'this model'} is a text-only model "
                             "and cannot take images; use a multimodal Gemma 3 checkpoint "
                             "(Gemma3ForConditionalGeneration: 4B, 12B or 27B)")
        return per_prompt

    def _with_images(self, prompts: list[Prompt], images: list[list] | None,
                     pan_and_scan) -> tuple[list[list[int]], dict]:
        """Prompts as ids (image placeholders laid out), and generate_steps' image arguments
        (embeddings with the soft tokens in, image groups), or {} when there are no images."""
        if images is None:
            if self.multimodal is not None:  # like Gemma3Processor: a marker needs its image
                boi = self.tokenizer.id_to_piece(self.multimodal.config.boi_token_id)
                if any(isinstance(p, str) and boi in p for p in prompts):
                    raise ValueError(f"the prompt has {boi} markers but no images were given "
                                     "(images=[...])")
            return [self._ids(p) for p in prompts], {}
        from .images import preprocess, prompt_ids
        from .model.multimodal import image_groups

        mm, c = self.multimodal, self.multimodal.config
        pixels, ids = [], []
        for prompt, imgs in zip(prompts, images):
            px, crops = preprocess(imgs, c.vision.image_size, pan_and_scan)
            pixels.append(px)
            if isinstance(prompt, str) or not imgs:
                ids.append(prompt_ids(self.tokenizer, c, prompt, crops) if imgs else self._ids(prompt))
            else:
                ids.append(prompt_ids(self.tokenizer, c, self._ids(prompt), crops))
        context = self.config.max_position_embeddings
        for p, px, imgs in zip(ids, pixels, images):
            if len(p) >= context:  # before spending time in the vision encoder
                raise PromptTooLongError(
                    f"the prompt has {len(p)} tokens, {len(px) * c.tokens_per_image} of them for "
                    f"{len(imgs)} image(s) ({len(px)} views at {c.tokens_per_image} tokens); the model "
                    f"context is {context} tokens (and at least one is needed for the answer)")
        device = self.model.device
        embeds, groups = [], []
        with torch.inference_mode():
            for p, px in zip(ids, pixels):
                x = torch.tensor([p], device=device)
                dtype = self.model.dtype
                feats = mm.image_features(px.to(device, dtype)) if len(px) else None
                embeds.append(mm.embed(x, feats)[0])
                groups.append(image_groups(x, c.image_token_id)[0])
        return ids, dict(inputs_embeds=embeds, image_groups=groups)

    def _chat_images(self, messages, images: Images) -> list:
        """The images of the conversation's image items in order: an item's own payload, else the
        next of `images`. (The template ignores the payloads.)"""
        per_prompt = self._images_per_prompt(images, 1, False)
        extra = list(per_prompt[0]) if per_prompt else []
        found = []
        for message in messages if isinstance(messages, (list, tuple)) else []:
            content = message.get("content") if isinstance(message, dict) else None
            for item in content if isinstance(content, (list, tuple)) else []:
                if not (isinstance(item, dict) and item.get("type") == "image"):
                    continue
                payload = item.get("image", item.get("path"))
                if payload is None and item.get("url") is not None:
                    url = str(item["url"])
                    if not url.startswith("file://"):
                        raise ValueError(f"image URLs are not fetched ({url[:60]}); download the "
                                         "image and give its path")
                    payload = url[len("file://"):]
                if payload is None:
                    if not extra:
                        raise ValueError("an image item of the conversation has no image: give "
                                         "{'type': 'image', 'image': PATH} or pass images=[...]")
                    payload = extra.pop(0)
                found.append(payload)
        if extra:
            raise ValueError(f"{len(extra)} of the images are not used: the conversation has fewer "
                             "{'type': 'image'} items than images")
        if found:
            self._images_per_prompt(found, 1, False)  # a text-only model raises its error
        return found
