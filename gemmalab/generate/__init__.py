"""Generation outside the model: sampling, prefill, decode steps, stops, streaming, and the batch core.

- `sampling.py`: SamplingParams (Gemma 3's published defaults), top-k / top-p, `sample` and
  `sample_with_logprob` (the log-probability under the distribution actually sampled from).
- `steps.py`: `prefill`, `decode_step`, `left_pad`, `chunk_bounds`, and `generate_steps`, a plain
  generator over one fixed batch (benchmarks, the evaluation harness, prompt lookup).
- `batch.py`: the generation core, `BatchGenerator` (continuous admission into the rows of one
  cache, n samples per prompt from one prefill, per-row seeds, per-token log-probs, stop ids and
  strings, UTF-8-safe text, finish reasons) and `sample_batch` for training rollouts. `LM.generate`
  / `LM.stream` and the server (`serve/engine.py`) run on it.
- `lookup.py`: prompt-lookup speculative decoding (one prompt); `text.py`: stop strings.
"""
from .batch import BatchGenerator, Group, Sample, SequenceEvent, sample_batch
from .lookup import NgramIndex, lookup_steps
from .sampling import SamplingParams, filtered_distribution, sample, sample_with_logprob
from .steps import (GenerationResult, PromptTooLongError, check_prompts, chunk_bounds, decode_step,
                    generate_steps, left_pad, prefill)
from .text import StopStrings, TextStream

__all__ = ["BatchGenerator", "GenerationResult", "Group", "NgramIndex", "PromptTooLongError",
           "Sample", "SamplingParams", "SequenceEvent", "StopStrings", "TextStream", "check_prompts",
           "chunk_bounds", "decode_step", "filtered_distribution", "generate_steps", "left_pad",
           "lookup_steps", "prefill", "sample", "sample_batch", "sample_with_logprob"]
