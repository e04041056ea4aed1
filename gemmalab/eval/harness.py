"""An lm-evaluation-harness backend: gemmalab models as the lm-eval model "gemmalab".

    import gemmalab.eval.harness, lm_eval
    lm_eval.simple_evaluate(model="gemmalab", model_args="pretrained=PATH,mode=native",
                            tasks=["arc_easy"])

or `gemmalab eval harness --tasks arc_easy [--model PATH]` (docs/eval_harness.md).

lm-eval 0.4 finds no plugins by itself, so importing this module registers the name. It registers a
lazy "module:Class" placeholder (lm-eval's own models/__init__.py MODEL_MAPPING does the same) and
builds the class on first use: every `gemmalab` command imports this module to build its parser,
and importing lm_eval.api.model (requests, numpy, ...) would add a third of a second to each.

The backend follows lm-eval's HFLM (lm_eval/models/huggingface.py) so that numbers compare with
`--model hf` runs of the same checkpoint: the same context/continuation split (TemplateLM's
`_encode_pair`: encode context+continuation and the context, the continuation is the tail; trailing
context whitespace moves to the continuation), the same request order (longest first), BOS as the
prefix of an empty context and of rolling windows, stop sequences cut as HFLM cuts them. Where HFLM is
known to mistreat Gemma we do not copy it (each place says why): one BOS in rolling windows, not two
(lm-eval issue #3333), a BOS at the head of every window (issue #2382), and left truncation keeps the
BOS (Gemma without a BOS is badly off, lm-eval PRs #1465, #2049).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import sys
from pathlib import Path

MODEL_NAME = "gemmalab"
CLASS_NAME = "GemmalabLM"
_NO_LM_EVAL = ("lm-evaluation-harness is not installed: pip install 'gemmalab[eval]' "
               "(or pip install lm-eval)")
_log = logging.getLogger(__name__)


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError(_NO_LM_EVAL)


def _register() -> None:
    """Put "gemmalab" in lm-eval's model registry as a lazy placeholder (nothing if lm-eval is
    absent: the CLI imports this module whether or not lm-eval is installed)."""
    if importlib.util.find_spec("lm_eval") is None:
        return
    # lm-eval's get_model registers its own models (lm_eval.models) only while the registry is
    # empty: register them first, or "hf", "vllm", ... would be unknown once "gemmalab" is in.
    import lm_eval.models  # noqa: F401  (placeholders only: 25 ms)
    from lm_eval.api.registry import model_registry
    model_registry.register(MODEL_NAME, target=f"{__name__}:{CLASS_NAME}")


_register()


def __getattr__(name: str):
    """`GemmalabLM` is built on first access (lm-eval's registry resolves its placeholder here)."""
    if name == CLASS_NAME:
        cls = _build_class()
        globals()[CLASS_NAME] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_class():
    _require_lm_eval()
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model

    cls = type(CLASS_NAME, (_Backend, TemplateLM),
               {"__module__": __name__, "__doc__": _Backend.__doc__, "__qualname__": CLASS_NAME})
    # A placeholder "gemmalab.eval.harness:GemmalabLM" upgrades to the class (Registry._store).
    return register_model(MODEL_NAME)(cls)


def _positive(name: str, value) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n


class _Backend:
    """lm-eval model "gemmalab": loglikelihood, loglikelihood_rolling and generate_until on a
    gemmalab model, batched.

    model_args: pretrained (GGUF file or Hugging Face directory; omitted: the embedded Gemma 3 270M),
    mode (auto, fp32, native, q8: see gemmalab.load), batch_size, max_length (default: the model
    context), max_gen_toks (default 256, as HFLM), add_bos_token (default true: Gemma needs it),
    rolling_bos (default true: a BOS at the head of every loglikelihood_rolling window),
    chunk_size (default 512: longer inputs run in chunks through a KV cache, one at a time),
    device; `lm=` takes an already loaded gemmalab LM instead of pretrained/mode/device.
    """

    backend = "causal"

    def __init__(self, pretrained: str | None = None, mode: str = "auto", batch_size=1,
                 max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool = True, rolling_bos: bool = True, chunk_size: int = 512,
                 device: str | None = None, max_batch_size=None, lm=None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"unknown gemmalab model_args: {', '.join(sorted(unknown))} (known: "
                             "pretrained, mode, batch_size, max_length, max_gen_toks, "
                             "add_bos_token, rolling_bos, chunk_size, device)")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported by the gemmalab backend; give a "
                             "number (8 is a good start on a CPU)")
        self._batch_size = _positive("batch_size", batch_size)
        if lm is None:
            import gemmalab
            lm = gemmalab.load(None if pretrained in (None, "") else str(pretrained), mode=mode,
                               device=device or "cpu")
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.add_bos_token, self.rolling_bos = bool(add_bos_token), bool(rolling_bos)
        self.chunk_size = _positive("chunk_size", chunk_size)
        # Quantized modes compute products of up to GEMV_MAX_ROWS rows with 8-bit activations and
        # larger ones in float: a request would score differently (by ~0.1 nats) with other batch
        # partners. Every product here gets more rows than that, so scores do not depend on the
        # batch: short batches get extra padding columns, and no chunk is that short. (Where the
        # CPU runs those float products in bf16, gemmalab.cpu.cpu_bf16, their rounding still
        # varies with the shape at the 1e-2 level: GEMMALAB_CPU_BF16=0 or mode=fp32 avoid it.)
        self._min_rows = 0
        if lm.mode != "fp32":
            from ..quant.linear import GEMV_MAX_ROWS
            self._min_rows = GEMV_MAX_ROWS + 1
            self.chunk_size = max(self.chunk_size, self._min_rows)
        context = lm.config.max_position_embeddings
        self._max_length = context if max_length is None else _positive("max_length", max_length)
        if not 2 <= self._max_length <= context:
            raise ValueError(f"max_length must be in [2, {context}] (the model context), got "
                             f"{self._max_length}")
        self._max_gen_toks = _positive("max_gen_toks", max_gen_toks)
        self._bos_text = self.tokenizer.id_to_piece(self.tokenizer.bos_id)
        self._warned: set[str] = set()

    # ---- what lm-eval reads ----------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id  # HFLM: end of *text*, the tokenizer's eos

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # HFLM: BOS when the tokenizer has one

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self.lm.model.device

    @property
    def tokenizer_name(self) -> str:
        return f"gemmalab-{self.lm.config.name or 'gemma3'}-{self.tokenizer.vocab_size}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """A description, not Jinja: the template is gemmalab.tokenizer.render_chat (Gemma 3's)."""
        return "gemma3 (gemmalab.tokenizer.render_chat)" if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True
                            ) -> str:
        # Starts with the "<bos>" text; tok_encode then adds no second BOS (HFLM's has_bos_prefix).
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"model_path": str(self.lm.path) if self.lm.path else None, "mode": self.lm.mode,
                "model_name": self.lm.config.name, "max_length": self.max_length}

    # ---- tokens ----------------------------------------------------------------------------------

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        """HFLM.tok_encode: a BOS unless told otherwise or the text already starts with one."""
        add = self.add_bos_token if add_special_tokens is None else bool(add_special_tokens)
        if add_special_tokens is None and string.startswith(self._bos_text):
            add = False
        ids = self.tokenizer.encode(string, add_bos=add)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special=skip_special_tokens)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _log.warning(message)

    def _fit(self, ctx: list[int], cont: list[int]) -> list[int]:
        """The model input whose last len(cont) positions predict `cont`: (ctx + cont)[:-1], cut
        from the left to max_length like HFLM's `[-(max_length + 1):][:-1]`, but keeping the BOS
        (Gemma scores without one are far off: lm-eval PR #1465)."""
        L = self.max_length
        inp = (ctx + cont)[:-1]
        if len(inp) <= L:
            return inp
        head = inp[:1] if inp[0] == self.prefix_token_id else []
        if len(cont) > L - len(head):
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit in max_length "
                             f"{L}")
        self._warn_once("truncate", f"inputs longer than max_length {L} tokens are cut from the "
                                    "left (the BOS is kept)")
        return head + inp[len(inp) - (L - len(head)):]

    # ---- scoring ---------------------------------------------------------------------------------

    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(targets), every target the argmax) for rows (input ids, targets): the
        last len(targets) positions of the input predict the targets.

        Inputs up to chunk_size tokens run as one left-padded batch (positions -1 mark the
        padding, which no real token sees); longer ones one at a time through a KV cache in
        chunks, as `LM.logits` does. Logits exist only at the target positions, a few hundred rows
        at a time: never T x 262k for a long input.
        """
        import torch

        model = self.lm.model
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        with torch.inference_mode():
            short = [i for i, (inp, _) in enumerate(rows) if len(inp) <= self.chunk_size]
            if short:
                T = max(len(rows[i][0]) for i in short)
                T = max(T, -(-self._min_rows // len(short)))
                ids = torch.full((len(short), T), self.lm.config.pad_token_id, dtype=torch.long)
                pos = torch.full((len(short), T), -1, dtype=torch.long)
                for b, i in enumerate(short):
                    inp = rows[i][0]
                    ids[b, T - len(inp):] = torch.tensor(inp)
                    pos[b, T - len(inp):] = torch.arange(len(inp))
                h = model.hidden_states(ids.to(model.device), pos.to(model.device))
                for b, i in enumerate(short):
                    targets = rows[i][1]
                    out[i] = self._target_logprobs(h[b, T - len(targets):], targets)
            for i, (inp, targets) in enumerate(rows):
                if out[i] is None:
                    out[i] = self._target_logprobs(self._chunked_hidden(inp, len(targets)), targets)
        return out

    def _chunked_hidden(self, inp: list[int], n: int):
        """Final hidden states (n, d) of the last n positions of one long input."""
        import torch

        from ..generate import chunk_bounds

        model = self.lm.model
        x = torch.tensor([inp], device=model.device)
        cache = model.make_cache(1, len(inp))
        keep = []
        bounds = chunk_bounds(len(inp), self.chunk_size)
        if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < self._min_rows:
            bounds[-2:] = [(bounds[-2][0], bounds[-1][1])]  # see _min_rows in __init__
        for s, e in bounds:
            h = model.hidden_states(x[:, s:e], cache=cache)[0]
            lo = max(s, len(inp) - n)
            if lo < e:
                keep.append(h[lo - s:])
        return torch.cat(keep)

    def _target_logprobs(self, h, targets: list[int]) -> tuple[float, bool]:
        import torch

        t = torch.tensor(targets, device=h.device)
        total, greedy = 0.0, True
        for s in range(0, len(targets), 256):  # bounds the (rows, vocab) logits
            logits = self.lm.model.lm_head(h[s:s + 256]).float()
            logp = torch.log_softmax(logits, dim=-1)
            total += float(logp.gather(1, t[s:s + 256, None]).sum())
            greedy = greedy and bool((logits.argmax(-1) == t[s:s + 256]).all())
        return total, greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids), as
        TemplateLM.loglikelihood builds them."""
        from lm_eval.models.utils import Collator
        from tqdm import tqdm

        def longest_first(req):  # HFLM's _collate: padding stays small, time estimates pessimistic
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        order = Collator(requests, sort_fn=longest_first)
        res = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for chunk in order.get_batched(n=self.batch_size):
            for (key, _, _), answer in zip(chunk, self._score(
                    [(self._fit(ctx, cont), cont) for _, ctx, cont in chunk])):
                res.append(answer)
                if key is not None:  # rolling windows are cached per document instead
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(1)
        bar.close()
        return order.get_original(res)

    def _rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], list[int]]]:
        """(context, continuation) windows that predict each token once (lm-eval's
        get_rolling_token_windows + make_disjoint_window, context_len=1).

        The text is encoded without a BOS and BOS is the prefix: HFLM encodes Gemma texts with
        their BOS and prefixes another, so it scores a BOS after a BOS (lm-eval issue #3333). With
        rolling_bos, windows after the first also start with a BOS (one position less for text):
        Gemma saw every training sequence start with one (lm-eval issue #2382).
        """
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        bos = self.prefix_token_id
        span = self.max_length - 1 if self.rolling_bos else self.max_length
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=tokens, prefix_token=bos, max_seq_len=span, context_len=1)]
        if self.rolling_bos:
            windows = [(ctx if k == 0 else [bos] + ctx, cont)
                       for k, (ctx, cont) in enumerate(windows)]
        return windows

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood given a BOS, windowed over max_length."""
        windows, owner = [], []
        for k, req in enumerate(requests):
            for ctx, cont in self._rolling_windows(self.tok_encode(req.args[0],
                                                                   add_special_tokens=False)):
                windows.append((None, ctx, cont))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, scores):
            totals[k] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ---- generation ------------------------------------------------------------------------------

    def _sampling(self, kwargs: dict) -> dict:
        """lm.generate's sampling arguments from normalized lm-eval gen_kwargs (what is left)."""
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0))
        # normalize_gen_kwargs sets temperature 0 without do_sample. HF semantics otherwise:
        # sampling without a temperature samples at 1.0; Gemma's generation_config has top_k 64,
        # top_p 0.95 (lm.generate's defaults).
        temperature = temperature if do_sample else 0.0
        params = dict(temperature=temperature, top_k=int(kwargs.pop("top_k", 64) or 0),
                      top_p=float(kwargs.pop("top_p", 0.95) or 1.0))
        if int(kwargs.pop("num_beams", 1)) != 1:
            raise ValueError("beam search (num_beams > 1) is not supported by the gemmalab backend")
        if kwargs:
            self._warn_once(f"kwargs{sorted(kwargs)}", "generation kwargs ignored by the gemmalab "
                                                       f"backend: {', '.join(sorted(kwargs))}")
        return params

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate until a stop sequence (`until`, plus the EOS text as HFLM adds it) or
        max_gen_toks tokens; the text before the first stop sequence."""
        from lm_eval.models.utils import (Collator, handle_stop_sequences, normalize_gen_kwargs,
                                          postprocess_generated_text)
        from tqdm import tqdm

        def longest_first(req):
            return -len(self.tok_encode(req[0])), req[0]

        order = Collator([r.args for r in requests], sort_fn=longest_first, group_by="gen_kwargs",
                         group_fn=lambda r: r[1])
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        res = []
        bar = tqdm(total=len(requests), disable=disable_tqdm,
                   desc="Running generate_until requests")
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = dict(normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            if kwargs.pop("max_length", None) is not None:
                self._warn_once("max_length", "max_length in generation kwargs is ignored; use "
                                              "max_gen_toks")
            sampling = self._sampling(kwargs)
            room = self.max_length - max_gen_toks  # HFLM: max_length minus the tokens to generate
            if room < 1:
                raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for a context in "
                                 f"max_length {self.max_length}")
            prompts = [self._left_truncate(self.tok_encode(c), room) for c in contexts]
            outs = self._generate(prompts, max_gen_toks, sampling, until)
            for context, gen_kwargs, out in zip(contexts, all_kwargs, outs):
                text = postprocess_generated_text(out, until, None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return order.get_original(res)

    def _generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: dict,
                  until: list[str]) -> list[str]:
        """LM.generate's loop (the same tokens), but the stop strings are looked for in the text
        returned, which skips special tokens like HFLM's tok_decode: LM.generate renders them, so
        "<unused73>" would stop at until=["e"]. Generation ends at <eos> / <end_of_turn> too."""
        from ..generate import SamplingParams, StopStrings, generate_steps

        n = len(prompts)
        stop_ids = tuple(self.tokenizer.stop_ids)
        decoders = [self.tokenizer.stream_decoder(skip_special=True) for _ in range(n)]
        stoppers = [StopStrings(until) for _ in range(n)]
        texts, done, hit = [""] * n, [False] * n, [False] * n
        for tokens, _ in generate_steps(self.lm.model, prompts, max_new_tokens,
                                        SamplingParams(**sampling), stop_ids,
                                        self.lm.config.pad_token_id):
            for b, tok in enumerate(tokens.tolist()):
                if done[b]:
                    continue
                if tok in stop_ids:
                    done[b] = True
                    continue
                piece, hit[b] = stoppers[b].push(decoders[b].push(tok))
                texts[b] += piece
                done[b] = hit[b]
            if all(done):
                break
        for b in range(n):
            if not hit[b]:  # text held back as a possible start of a stop string, or bytes
                texts[b] += stoppers[b].push(decoders[b].flush())[0] + stoppers[b].flush()
        return texts

    def _left_truncate(self, ids: list[int], room: int) -> list[int]:
        """The last `room` tokens, keeping the BOS (HFLM's left truncation drops it: see _fit)."""
        if len(ids) <= room:
            return ids
        self._warn_once("truncate_gen", f"contexts longer than {room} tokens (max_length minus "
                                        "max_gen_toks) are cut from the left (the BOS is kept)")
        head = ids[:1] if ids[0] == self.prefix_token_id and room > 1 else []
        return head + ids[len(ids) - (room - len(head)):]


# ---- gemmalab eval harness ---------------------------------------------------------------------


def _limit(text: str) -> int | float:
    """lm-eval's --limit: a count of documents, or a fraction of them when below 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return int(value) if value >= 1 and value.is_integer() else value


def add_cli(evals) -> None:
    """Register `gemmalab eval harness` on the `gemmalab eval` subparsers."""
    from ..cli import _nonneg_int, _positive_int
    from .report import common_cli

    p = evals.add_parser(
        "harness", help="lm-evaluation-harness tasks (hellaswag, arc_easy, local YAML tasks...)",
        description="Run lm-evaluation-harness tasks on a gemmalab model (lm-eval model "
                    "\"gemmalab\"). Standard tasks download their datasets from the Hugging Face "
                    "hub; --include-path DIR adds local YAML tasks (docs/eval_harness.md). Writes "
                    "OUT/harness.json (lm-eval's results) and OUT/harness.md (its table).")
    p.add_argument("--tasks", required=True,
                   help="comma-separated task, group or tag names (globs work: 'arc_*'), or YAML "
                        "files")
    common_cli(p, out_default="runs/eval/harness")  # --model, --mode, --threads, --out, --json, --no-progress
    p.add_argument("--output-path", dest="out", default=None, help="the same as --out (lm-eval's name)")
    p.add_argument("--model-args", default="",
                   help="lm-eval style key=value,... for the backend: pretrained, mode, "
                        "max_length, max_gen_toks, add_bos_token, rolling_bos, chunk_size")
    p.add_argument("--num-fewshot", type=_nonneg_int, default=None,
                   help="few-shot examples (default: each task's own, else 0)")
    p.add_argument("--limit", type=_limit, default=None,
                   help="documents per task (a fraction when < 1); for quick checks only")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="requests per forward "
                   "pass (default 8)")
    p.add_argument("--include-path", action="append", default=[],
                   help="directory of extra task YAMLs (repeatable)")
    p.add_argument("--gen-kwargs", default=None,
                   help="generation overrides for generate_until tasks, e.g. max_gen_toks=64")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="wrap prompts in the Gemma 3 chat template (instruction-tuned models)")
    p.add_argument("--device", default=None, help="torch device (default cpu; fp32 mode on GPU)")
    p.add_argument("--seed", type=int, default=0, help="python random seed (lm-eval's default 0)")
    p.add_argument("--log-samples", action="store_true",
                   help="also write every document's inputs and outputs to "
                        "OUT/harness_samples_TASK.json")
    p.set_defaults(func=run)


def _model_args(args) -> dict:
    from lm_eval.utils import simple_parse_args_string

    model_args = simple_parse_args_string(args.model_args)
    if args.model is not None:
        if model_args.get("pretrained") not in (None, args.model):
            raise ValueError(f"--model {args.model} and --model-args "
                             f"pretrained={model_args['pretrained']} disagree; give one")
        model_args["pretrained"] = args.model
    if args.mode != "auto" or "mode" not in model_args:
        model_args["mode"] = args.mode
    if args.device is not None:
        model_args["device"] = args.device
    pretrained = model_args.get("pretrained")
    if pretrained not in (None, "") and not Path(str(pretrained)).expanduser().exists():
        # before indexing the tasks (15 s for lm-eval's 14k built-in ones)
        raise FileNotFoundError(f"model not found: {pretrained}")
    return model_args


def resolve_tasks(names: list[str], include_path: list[str], metadata: dict | None = None):
    """(TaskManager, task names), or ValueError naming the unknown ones.

    When every name is a task of `include_path`, only those directories are indexed: lm-eval's
    14k built-in tasks take 15 s to index, and an include path overrides them anyway (TaskManager
    reads defaults first, then include paths). Groups may name built-in tasks, so they get the
    full index.
    """
    from lm_eval.tasks import TaskManager

    for p in include_path:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"--include-path {p}: no such directory")
    paths = [str(Path(p).resolve()) for p in include_path]
    files = [n for n in names if n.endswith((".yaml", ".yml"))]
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"no such task file: {f}")
    wanted = [n for n in names if n not in files]
    metadata = metadata or {}
    if paths and wanted:
        local = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
        from lm_eval.tasks._index import Kind
        matched = {n: local.match_tasks([n]) for n in wanted}
        if all(matched.values()) and all(local.task_index[t].kind in (Kind.TASK, Kind.PY_TASK)
                                         for ts in matched.values() for t in ts):
            return local, _dedup([t for n in wanted for t in matched[n]]) + [
                str(Path(f).resolve()) for f in files]
    manager = TaskManager(include_path=paths or None, metadata=metadata)
    matched = {n: manager.match_tasks([n]) for n in wanted}
    missing = [n for n, found in matched.items() if not found]
    if missing:
        import difflib
        hints = sorted({h for n in missing for h in difflib.get_close_matches(
            n, manager.all_tasks, n=3, cutoff=0.75)})
        where = f", with those of {', '.join(include_path)}" if include_path else ""
        raise ValueError(
            f"unknown task{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}: not "
            f"among the {len(manager.all_tasks)} lm-eval tasks, groups and tags (built-in{where})"
            + (f" (did you mean {', '.join(hints)}?)" if hints else "")
            + "; `lm-eval ls tasks` lists them")
    return manager, _dedup([t for n in wanted for t in matched[n]]) + [
        str(Path(f).resolve()) for f in files]


def _dedup(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def run(args) -> int:
    """`gemmalab eval harness`: lm-eval's simple_evaluate with the "gemmalab" model."""
    _require_lm_eval()
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.log_samples and not args.out:
        raise ValueError("--log-samples writes into the --out directory; give --out DIR")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks is empty; give task names, e.g. --tasks arc_easy,hellaswag")
    model_args = _model_args(args)
    manager, tasks = resolve_tasks(names, args.include_path, metadata=dict(model_args))
    getattr(sys.modules[__name__], CLASS_NAME)  # build and register the class
    if args.no_progress:
        import functools

        from tqdm import tqdm
        tqdm.__init__ = functools.partialmethod(tqdm.__init__, disable=True)

    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    from .report import finish, write_json

    # With --json, stdout carries only the JSON object: anything lm-eval prints goes to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet:
        results = lm_eval.simple_evaluate(
            model=MODEL_NAME, model_args=model_args, tasks=tasks, num_fewshot=args.num_fewshot,
            batch_size=args.batch_size, limit=args.limit, task_manager=manager,
            log_samples=args.log_samples, gen_kwargs=args.gen_kwargs,
            apply_chat_template=args.apply_chat_template, random_seed=args.seed)
    samples = results.pop("samples", None)
    # lm-eval's results hold numpy scalars, sets and functions; its own serializer makes them JSON.
    results = json.loads(json.dumps(results, default=handle_non_serializable, ensure_ascii=False))
    table = make_table(results)
    if "groups" in results:
        table += "\n" + make_table(results, "groups")
    if args.out and samples:
        for task, rows in samples.items():
            write_json(Path(args.out).expanduser() / f"harness_samples_{task}.json",
                       json.loads(json.dumps(rows, default=handle_non_serializable)))
    summary = table + (f"\nwrote {Path(args.out) / 'harness.json'} and harness.md"
                       if args.out else "")
    return finish(args, results, table, "harness", summary)
