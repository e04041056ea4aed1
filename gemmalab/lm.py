"""`gemmalab.load()` and the LM object: a model, its tokenizer, and generation in one handle."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .checkpoints import CheckpointError, checkpoint_kind
from .config import Gemma3Config
from .generate import GenerationResult, SamplingParams, StopStrings, generate_steps
from .model import Gemma3

Prompt = str | Sequence[int]


def load(path: str | Path | None = None, *, mode: str = "auto", dtype: torch.dtype | None = None,
         device: str | torch.device = "cpu") -> "LM":
    """Load a GGUF file or a Hugging Face directory; no path loads the embedded Gemma 3 270M.

    mode: "auto" (default) picks the fastest mode that meets the quality bar: "native" on a CPU
    with AVX2/FMA/F16C, "fp32" elsewhere. "fp32" dequantizes every weight (the exact reference
    path; bf16 on GPU unless `dtype` says otherwise). "native" computes on the file's own quantized
    blocks (float checkpoints are quantized to Q8_0); "q8" puts every matrix in Q8_0. See
    docs/benchmarks.md for speed and quality of each mode. fp16 is refused: Gemma 3 activations
    overflow it (spec 10.1).
    """
    from ._paths import default_model_path
    from .checkpoints import gguf as gguf_ckpt
    from .checkpoints import hf as hf_ckpt
    from .quant import kernels
    from .quant.model import BLOCK_TYPES, MODES, build_quantized
    from .tokenizer import Tokenizer

    t0 = time.perf_counter()
    device = torch.device(device)
    if mode not in ("auto",) + MODES:
        raise ValueError(f"unknown mode {mode!r}; use auto, {', '.join(MODES)}")
    if mode == "auto":
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
    if checkpoint_kind(path) == "hf":
        config, tensors = hf_ckpt.read_hf_dir(path)
        tokenizer = Tokenizer.from_hf_dir(path)
        blocks = {}
    else:
        reader = gguf_ckpt.open_gguf(path)
        config = gguf_ckpt.config_from_gguf(reader, name=path.stem)
        tokenizer = Tokenizer.from_gguf(reader)
        if mode == "fp32":
            tensors = gguf_ckpt.read_tensors(reader, path, dtype=dtype)
        else:
            blocks, tensors = gguf_ckpt.read_blocks(reader, path, BLOCK_TYPES)
        del reader  # unmaps the file
    if mode == "fp32":
        model = build_model(config, tensors, dtype, device, source=path)
    else:
        try:
            model = build_quantized(config, blocks, tensors, mode)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from None
    return LM(model, tokenizer, path=path, load_seconds=time.perf_counter() - t0, mode=mode)


def build_model(config: Gemma3Config, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device, source: Path | str = "") -> Gemma3:
    """Build on the meta device and assign the checkpoint tensors (no random init, no extra copy)."""
    with torch.device("meta"):
        model = Gemma3(config)
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
    """A loaded model with its tokenizer. `lm.generate`, `lm.stream`, `lm.chat`, `lm.logits`."""

    def __init__(self, model: Gemma3, tokenizer, path: Path | None = None,
                 load_seconds: float = 0.0, mode: str = "fp32"):
        self.model, self.tokenizer, self.path = model, tokenizer, path
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
                 stop_ids: Sequence[int] | None = None, lookup: int = 0
                 ) -> GenerationResult | list[GenerationResult]:
        """Continue a prompt (text or ids); a list of prompts runs as one batch and returns a list.

        temperature=0 is greedy. Generation ends at <eos> / <end_of_turn> (or `stop_ids`), at any of
        the `stop` strings (cut from the text), or after max_new_tokens. lookup=K drafts up to K
        tokens per step by prompt lookup (one prompt; same output, fewer model passes on text that
        repeats its context; acceptance counts in `.stats`).
        """
        batched = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
        prompts = [self._ids(p) for p in (prompt if batched else [prompt])]
        results = self._generate(prompts, max_new_tokens, self._params(temperature, top_k, top_p,
                                                                       seed), stop, stop_ids, lookup)
        return results if batched else results[0]

    def _generate(self, prompts, max_new_tokens, params, stop, stop_ids, lookup=0
                  ) -> list[GenerationResult]:
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        stop_ids = tuple(self.tokenizer.stop_ids if stop_ids is None else stop_ids)
        n = len(prompts)
        new: list[list[int]] = [[] for _ in range(n)]
        done, reason = [False] * n, ["length"] * n
        decoders = [self.tokenizer.stream_decoder() for _ in range(n)]
        stoppers = [StopStrings(stop) for _ in range(n)]
        texts = [""] * n
        stats: dict = {}
        if max_new_tokens:
            for tokens, _ in generate_steps(self.model, prompts, max_new_tokens, params, stop_ids,
                                            self.config.pad_token_id, stats=stats, lookup=lookup):
                for b, tok in enumerate(tokens.tolist()):
                    if done[b]:
                        continue
                    new[b].append(tok)
                    if tok in stop_ids:
                        done[b], reason[b] = True, "stop"
                        continue
                    piece, hit = stoppers[b].push(decoders[b].push(tok))
                    texts[b] += piece
                    if hit:
                        done[b], reason[b] = True, "stop"
                if all(done):
                    break
        for b in range(n):
            if reason[b] == "length":
                texts[b] += stoppers[b].push(decoders[b].flush())[0] + stoppers[b].flush()
        return [GenerationResult(texts[b], new[b], reason[b], len(prompts[b]), stats)
                for b in range(n)]

    def stream(self, prompt: Prompt, max_new_tokens: int = 128, *, temperature: float = 1.0,
               top_k: int = 64, top_p: float = 0.95, seed: int | None = None,
               stop: Sequence[str] = (), stats: dict | None = None, lookup: int = 0) -> Iterator[str]:
        """Yield text as it is generated; pieces never split a UTF-8 character or a stop string."""
        params = self._params(temperature, top_k, top_p, seed)
        decoder, stopper = self.tokenizer.stream_decoder(), StopStrings(stop)
        stop_ids = tuple(self.tokenizer.stop_ids)
        for tokens, _ in generate_steps(self.model, [self._ids(prompt)], max_new_tokens, params,
                                        stop_ids, self.config.pad_token_id, stats=stats,
                                        lookup=lookup):
            tok = int(tokens[0])
            if tok in stop_ids:
                return
            piece, hit = stopper.push(decoder.push(tok))
            if piece:
                yield piece
            if hit:
                return
        tail = stopper.push(decoder.flush())[0] + stopper.flush()
        if tail:
            yield tail

    def chat(self, messages: list[dict], max_new_tokens: int = 256, **kwargs) -> GenerationResult:
        """Answer a conversation formatted with the Gemma 3 chat template."""
        return self.generate(self.tokenizer.encode_chat(messages), max_new_tokens, **kwargs)

    @torch.inference_mode()
    def logits(self, ids: Prompt, chunk_size: int = 512) -> torch.Tensor:
        """Next-token logits (T, V) in fp32 for every position of one sequence."""
        ids = self._ids(ids)
        if len(ids) > self.config.max_position_embeddings:
            raise ValueError(f"{len(ids)} tokens exceed the model context "
                             f"{self.config.max_position_embeddings}")
        x = torch.tensor([ids], device=self.model.device)
        cache = self.model.make_cache(1, len(ids))
        out = [self.model(x[:, s:s + chunk_size], cache=cache)[0].float()
               for s in range(0, len(ids), chunk_size)]
        return torch.cat(out, 0)
