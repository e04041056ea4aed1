"""SFT training throughput: gemmalab vs transformers + TRL `SFTTrainer`, same model, data and machine.

    pip install trl datasets          # only for this benchmark; gemmalab never imports TRL
    python bench/bench_sft.py [--seq-len 256] [--batch-size 2] [--warmup 2] [--steps 6] [--out docs/training.md]
    python bench/bench_sft.py --report-only --workdir DIR    # rewrite the report from DIR's saved results
    python bench/bench_sft.py --autocast bf16 --with-fp32-baseline --out /tmp/training_bf16.md

Model: the embedded Gemma 3 270M (`gemmalab.load()`), fp32 weights. TRL trains a transformers
`Gemma3ForCausalLM` built from the same weights (`config_to_hf` + our state dict under `model.`);
the two models' logits are compared once before any timing.

Precision (`--autocast`): "none" (the default) trains both libraries in plain fp32; "bf16" trains
both with bf16 autocast over fp32 master weights (gemmalab `model.autocast="bfloat16"`; TRL
`bf16=True, use_cpu=True`, i.e. accelerate's `torch.autocast("cpu", torch.bfloat16)` around the
model's forward). `--with-fp32-baseline` also runs gemmalab in fp32 in the same invocation, so the
report gives gemmalab bf16 / gemmalab fp32 and gemmalab bf16 / TRL bf16. `gemmalab.cpu.describe()`
(CPU model, ISA flags, kernel variant, bf16 support, machine load) goes into the results.

Data: a deterministic JSONL of chat records made from CPython stdlib docstrings
(user: "Explain `name`.", assistant: the docstring). Both libraries pack the records into rows of
`--seq-len` tokens (each document attends only to itself) and train on the assistant turns only:
gemmalab with `data.train_on="model"`, TRL with `assistant_only_loss=True` (TRL swaps in its Gemma 3
training template with `{% generation %}` markers), or prompt/completion records if that fails.

Timing: each library runs in its own subprocess (so peak RSS is its own), with the same number of
threads. The first `--warmup` optimizer steps are discarded, and for the next `--steps` the median of
per-step tokens/s is reported. A step's time is the wall time between the ends of consecutive steps
(data, forward, backward, clipping, optimizer, logging), for both libraries: gemmalab's from the
`metrics.jsonl` rows (`log_every=1`), TRL's from a `TrainerCallback` (`on_step_end`); TRL's
`on_step_begin` -> `on_step_end` time (compute only, no data loading or logging) is reported too.
'input tokens' are the real (non-padding) tokens fed to the model, 'target tokens' those trained on.
Ratio = gemmalab tokens/s / TRL tokens/s.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALL_HINT = ("bench_sft.py compares against Hugging Face TRL, which is not installed.\n"
                "Install it (it is a benchmark-only dependency, never needed by gemmalab):\n"
                "    pip install trl datasets\n"
                "(from a checkout with the CPU torch pin: pip install -c constraints.txt trl datasets)")

# --autocast -> gemmalab's model.autocast (pinned: "auto" would pick bf16 on a CPU with native bf16).
GEMMALAB_AUTOCAST = {"none": "none", "bf16": "bfloat16"}

# Modules whose public docstrings make the data set, in this order.
DOC_MODULES = [
    "os", "os.path", "json", "re", "collections", "itertools", "functools", "pathlib", "string",
    "textwrap", "shutil", "random", "statistics", "heapq", "bisect", "copy", "csv", "datetime",
    "difflib", "fnmatch", "glob", "gzip", "hashlib", "inspect", "io", "operator", "pprint",
    "tempfile", "typing", "urllib.parse", "zipfile", "argparse", "base64", "calendar",
    "contextlib", "dataclasses", "decimal", "enum", "fractions", "logging", "shlex", "subprocess",
    "threading", "time", "uuid", "weakref", "math", "struct", "tarfile", "sqlite3", "socket",
    "email.utils", "html", "http.client", "unittest", "queue", "sched", "secrets", "traceback",
]


# ---------------------------------------------------------------------------------------------------------
# Data

def make_records(n: int, min_chars: int = 80, max_chars: int = 700) -> list[dict]:
    """`n` chat records from stdlib docstrings: deterministic for a given Python version."""
    import importlib

    records, seen = [], set()
    for mod_name in DOC_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name in sorted(dir(mod)):
            if name.startswith("_"):
                continue
            obj = getattr(mod, name, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc or not (min_chars <= len(doc) <= max_chars) or doc in seen:
                continue
            seen.add(doc)
            records.append({"messages": [
                {"role": "user", "content": f"Explain `{mod_name}.{name}`."},
                {"role": "assistant", "content": doc}]})
            if len(records) == n:
                return records
    if len(records) < n:
        raise SystemExit(f"only {len(records)} docstrings found, {n} asked")
    return records


# ---------------------------------------------------------------------------------------------------------
# Children (one library per process)

def _setup_threads(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def child_gemmalab(a: argparse.Namespace) -> dict:
    """Train with gemmalab.train.sft; per-step times from metrics.jsonl."""
    import resource

    import torch
    from gemmalab._paths import default_model_path
    from gemmalab.tokenizer import Tokenizer
    from gemmalab.train.config import build_config
    from gemmalab.train.data import IGNORE_INDEX, PackedDataset
    from gemmalab.train.recipes.sft import train_sft

    _setup_threads(a.threads)
    total = a.warmup + a.steps
    out_dir = Path(a.workdir) / ("gemmalab_run" if a.autocast == "none" else f"gemmalab_run_{a.autocast}")
    raw = {"model": {"dtype": "float32", "autocast": GEMMALAB_AUTOCAST[a.autocast]},
           "data": {"train": [str(Path(a.workdir) / "data.jsonl")], "seq_len": a.seq_len,
                    "batch_size": a.batch_size, "train_on": "model"},
           "optim": {"lr": a.lr, "grad_accum": 1, "weight_decay": 0.0, "grad_clip": 1.0},
           "run": {"out_dir": str(out_dir), "steps": total, "log_every": 1,
                   "save_every": total + 1, "threads": a.threads, "device": "cpu", "seed": 0}}
    cfg = build_config(raw)

    # The batches train_sft will see (the stream is deterministic): real and target tokens per step.
    tok = Tokenizer.from_gguf(default_model_path())
    data = PackedDataset(cfg.data.train, tok, cfg.data.seq_len, cfg.data.batch_size, seed=cfg.run.seed,
                         shuffle_buffer=cfg.data.shuffle_buffer, train_on=cfg.data.train_on)
    per_step = []
    for _, b in zip(range(total), data):
        per_step.append(dict(input=int((b["segment_ids"] >= 0).sum()),
                             slots=int(b["input_ids"].numel()),
                             target=int((b["targets"] != IGNORE_INDEX).sum())))
    del data, tok

    t0 = time.perf_counter()
    train_sft(cfg, progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps, prev = [], 0
    for r, s in zip(rows, per_step):
        target = r["tokens"] - prev
        prev = r["tokens"]
        if target != s["target"]:
            raise RuntimeError(f"step {r['step']}: metrics say {target} target tokens, the replayed "
                               f"stream {s['target']}")
        steps.append(dict(step=r["step"], wall_s=target / r["tokens_per_s"], input=s["input"],
                          slots=s["slots"], target=target, loss=r["loss"]))
    return dict(library="gemmalab", autocast=a.autocast, steps=steps, train_call_s=wall,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                torch=torch.__version__, optimizer=describe_optimizer(cfg),
                loss_mask="train_on='model' (model turns: content + <end_of_turn>)")


def describe_optimizer(cfg) -> str:
    """Which torch AdamW code path `train_sft`'s `make_optimizer` picks on CPU."""
    import torch
    from gemmalab.train.trainer import make_optimizer

    d = make_optimizer(torch.nn.Linear(2, 2), cfg).defaults
    path = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"
    return f"torch.optim.AdamW ({path} on CPU)"


def build_hf_model(lm):
    """transformers Gemma3ForCausalLM holding the weights of our model (fp32)."""
    import torch
    import transformers
    from gemmalab.checkpoints.hf import config_to_hf

    d = config_to_hf(lm.model.config)
    d.pop("model_type", None)
    d.pop("architectures", None)
    hf_cfg = transformers.Gemma3TextConfig(**d)
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.Gemma3ForCausalLM(hf_cfg).to(torch.float32)
    want = hf.state_dict()
    ours = {"model." + k: v for k, v in lm.model.state_dict().items()}
    sd = {k: v for k, v in ours.items() if k in want}
    missing = sorted(set(want) - set(sd) - {"lm_head.weight"})
    if missing:
        raise RuntimeError(f"transformers parameters not found in ours: {missing[:5]}")
    hf.load_state_dict(sd, strict=False)
    if hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens")
    return hf, sorted(set(ours) - set(want))


def child_trl(a: argparse.Namespace) -> dict:
    """Train Gemma3ForCausalLM (our weights) with trl.SFTTrainer; per-step times from a callback."""
    import gc
    import resource

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from trl.chat_template_utils import gemma3_chat_template

    import gemmalab
    from gemmalab._paths import default_model_path
    from gemmalab.tokenizer import render_chat
    from gemmalab.train.data import tokenize_record

    _setup_threads(a.threads)
    transformers.logging.set_verbosity_error()
    records = [json.loads(line) for line in (Path(a.workdir) / "data.jsonl").read_text().splitlines()]

    # Same model: our weights in transformers' class, checked on one prompt.
    lm = gemmalab.load(mode="fp32", dtype=torch.float32)
    hf, unused = build_hf_model(lm)
    prompt = lm.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        ours = lm.logits(prompt).float()
        theirs = hf.eval()(torch.tensor([prompt])).logits[0].float()
    max_diff = float((ours - theirs).abs().max())
    same_top1 = bool((ours.argmax(-1) == theirs.argmax(-1)).all())
    if max_diff > 1e-3:
        raise RuntimeError(f"gemmalab and transformers logits differ by {max_diff:.2e} (> 1e-3)")

    # Same tokenizer: transformers' from the GGUF, with the Gemma 3 chat template TRL knows.
    path = default_model_path()
    t0 = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok_load_s = time.perf_counter() - t0
    had_template = bool(getattr(tok, "chat_template", None))
    tok.chat_template = gemma3_chat_template  # the spec 4.3 template; byte-identical to TRL's copy
    same_ids, our_targets, fits = 0, 0, 0
    for rec in records:
        text = tok.apply_chat_template(rec["messages"], tokenize=False)
        if text != (tok.bos_token or "") + render_chat(rec["messages"], add_generation_prompt=False):
            raise RuntimeError("transformers' chat template renders differently from gemmalab's")
        ids = tok(text, add_special_tokens=False).input_ids
        our_ids, mask = tokenize_record(rec, lm.tokenizer, train_on="model")
        same_ids += ids == our_ids
        our_targets += sum(mask)
        fits += len(our_ids) <= a.seq_len
    del lm
    gc.collect()

    total = a.warmup + a.steps
    times: dict[str, dict[int, float]] = {"begin": {}, "end": {}}
    batches: list[dict] = []

    class StepTimer(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            times["end"][0] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            times["begin"][state.global_step + 1] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times["end"][state.global_step] = time.perf_counter()

    class CountingSFTTrainer(trl.SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            ids = inputs["input_ids"]
            n_in = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
            n_tgt = int((inputs["labels"][:, 1:] != -100).sum())
            batches.append(dict(input=n_in, target=n_tgt, shape=list(ids.shape)))
            return super().training_step(model, inputs, num_items_in_batch)

    def sft_args(assistant_only: bool):
        return trl.SFTConfig(
            output_dir=str(Path(a.workdir) / "trl_run"), max_length=a.seq_len, packing=True,
            per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
            learning_rate=a.lr, weight_decay=0.0, max_grad_norm=1.0, max_steps=total,
            logging_steps=1, save_strategy="no", report_to=[], assistant_only_loss=assistant_only,
            use_cpu=True, bf16=a.autocast == "bf16", fp16=False, gradient_checkpointing=False, seed=0,
            dataloader_num_workers=0, disable_tqdm=True)

    hf.train()
    loss_mask, fallback_error = "assistant_only_loss=True (TRL's gemma3_training template)", None
    try:
        trainer = CountingSFTTrainer(model=hf, args=sft_args(True), processing_class=tok,
                                     train_dataset=Dataset.from_list(records), callbacks=[StepTimer()])
    except Exception as e:  # noqa: BLE001 - report it and fall back to prompt/completion records
        fallback_error = f"{type(e).__name__}: {e}"
        loss_mask = "prompt/completion records (completion-only loss)"
        pc = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in records]
        trainer = CountingSFTTrainer(model=hf, args=sft_args(False), processing_class=tok,
                                     train_dataset=Dataset.from_list(pc), callbacks=[StepTimer()])
    ds = trainer.train_dataset
    # Trained tokens of the prepared (tokenized, masked, packed) data set: labels are unshifted and the
    # first token of every sequence (BOS) is never trained, so this counts next-token targets.
    trl_targets = (int(sum(sum(t != -100 for t in row) for row in ds["labels"]))
                   if "labels" in ds.column_names else None)
    trainer.train()

    steps, losses = [], [r.get("loss") for r in trainer.state.log_history if "loss" in r]
    for i in range(1, total + 1):
        b = batches[i - 1]
        steps.append(dict(step=i, wall_s=times["end"][i] - times["end"][i - 1],
                          compute_s=times["end"][i] - times["begin"][i], input=b["input"],
                          target=b["target"], shape=b["shape"],
                          loss=losses[i - 1] if i - 1 < len(losses) else None))
    return dict(library="trl", autocast=a.autocast, bf16_arg=bool(trainer.args.bf16),
                mixed_precision=str(getattr(trainer.accelerator, "mixed_precision", None)), steps=steps,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                trl=trl.__version__, transformers=transformers.__version__, torch=torch.__version__,
                optimizer=str(trainer.args.optim.value if hasattr(trainer.args.optim, "value")
                              else trainer.args.optim),
                attn=hf.config._attn_implementation, padding_free=bool(trainer.padding_free),
                packing_strategy=trainer.args.packing_strategy, loss_mask=loss_mask,
                fallback_error=fallback_error, logits_max_abs_diff=max_diff, same_top1=same_top1,
                unused_gemmalab_tensors=unused, tokenizer_load_s=tok_load_s,
                gguf_had_chat_template=had_template, records=len(records),
                records_same_ids=same_ids, records_fit_seq_len=fits,
                dataset_targets_gemmalab=our_targets, dataset_targets_trl=trl_targets,
                packed_rows=len(ds))


def child_profile(a: argparse.Namespace) -> dict:
    """Where one gemmalab step's time goes: phase timings, then a torch.profiler table."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from gemmalab.train.config import build_config
    from gemmalab.train.data import IGNORE_INDEX, PackedDataset
    from gemmalab.train.losses import chunked_cross_entropy
    from gemmalab.train.build import build_model_and_tokenizer
    from gemmalab.train.trainer import make_optimizer

    _setup_threads(a.threads)
    cfg = build_config({"model": {"autocast": GEMMALAB_AUTOCAST[a.autocast]},
                        "data": {"train": [str(Path(a.workdir) / "data.jsonl")],
                                 "seq_len": a.seq_len, "batch_size": a.batch_size},
                        "optim": {"lr": a.lr}, "run": {"device": "cpu", "threads": a.threads}})
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if a.autocast == "bf16"
           else contextlib.nullcontext())  # as train_sft's LossModule does
    model, tok = build_model_and_tokenizer(cfg, torch.device("cpu"))
    opt = make_optimizer(model, cfg)
    batches = iter(PackedDataset(cfg.data.train, tok, cfg.data.seq_len, cfg.data.batch_size, seed=0))

    def step(phases: dict | None = None):  # train_sft's step (micro_batch_loss inlined), phase by phase
        t = [time.perf_counter()]
        b = next(batches)
        norm = max(1.0, float((b["targets"] != IGNORE_INDEX).sum()))
        t.append(time.perf_counter())
        with amp:
            h = model.hidden_states(b["input_ids"], b["positions"], segment_ids=b["segment_ids"])
            t.append(time.perf_counter())
            loss = chunked_cross_entropy(h, model.embed_tokens.weight, b["targets"],
                                         softcap=model.config.final_logit_softcapping, normalizer=norm)
            t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        if phases is not None:
            names = ["data", "forward (blocks)", "loss forward (chunked CE)", "backward",
                     "grad clip", "AdamW step"]
            for n, x, y in zip(names, t, t[1:]):
                phases[n] = y - x

    step()  # warm-up
    phases: dict = {}
    step(phases)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40)

    # The optimizer step alone, same parameters and (constant) gradients, three torch AdamW code paths.
    import gc
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.full_like(p, 1e-4)
    opt.state.clear()  # free train_sft's optimizer state before creating three others
    gc.collect()
    adamw = {}
    for name, kw in (("for-loop (torch default on CPU)", dict(foreach=False)),
                     ("foreach=True", dict(foreach=True)), ("fused=True", dict(fused=True))):
        try:
            o = torch.optim.AdamW(params, lr=a.lr, **kw)
            o.step()  # creates the state
            t0 = time.perf_counter()
            o.step()
            adamw[name] = time.perf_counter() - t0
            del o
        except Exception as e:  # noqa: BLE001 - report it, keep the rest
            adamw[name] = f"failed: {type(e).__name__}: {e}"[:200]
        gc.collect()
    return dict(phases=phases, table=table, adamw=adamw, autocast=a.autocast)


# ---------------------------------------------------------------------------------------------------------
# Parent

def run_child(which: str, a: argparse.Namespace, timeout: int = 900, autocast: str | None = None,
              name: str | None = None, machine: dict | None = None) -> dict:
    """Run one child; `autocast` overrides --autocast, `name` the result's name (default: which);
    `machine` (`gemmalab.cpu.describe()`) is recorded in the result."""
    from gemmalab.cpu import machine_load

    name = name or which
    autocast = autocast or a.autocast
    result = Path(a.workdir) / f"result_{name}.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", which, "--result", str(result),
           "--workdir", a.workdir, "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size),
           "--warmup", str(a.warmup), "--steps", str(a.steps), "--lr", str(a.lr),
           "--threads", str(a.threads), "--autocast", autocast]
    print(f"[{name}] running ({'bf16 autocast' if autocast == 'bf16' else 'fp32'}) ...", flush=True)
    t0 = time.perf_counter()
    load_before, machine_before = os.getloadavg()[0], machine_load()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    load_after, machine_after = os.getloadavg()[0], machine_load()
    if proc.returncode != 0 or not result.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"[{name}] failed (exit {proc.returncode})")
    out = json.loads(result.read_text())
    out["process_s"] = time.perf_counter() - t0
    out["loadavg"] = (load_before, load_after)
    out["machine_load"] = dict(before=machine_before, after=machine_after)
    out.setdefault("autocast", autocast)
    if machine is not None:
        out["cpu"] = machine
    result.write_text(json.dumps(out))
    print(f"[{name}] done in {out['process_s']:.0f} s", flush=True)
    return out


def summarize(res: dict, warmup: int) -> dict:
    timed = res["steps"][warmup:]
    s = dict(input_tok_s=statistics.median(x["input"] / x["wall_s"] for x in timed),
             target_tok_s=statistics.median(x["target"] / x["wall_s"] for x in timed),
             step_s=statistics.median(x["wall_s"] for x in timed),
             input_per_step=statistics.mean(x["input"] for x in timed),
             target_per_step=statistics.mean(x["target"] for x in timed))
    if "compute_s" in timed[0]:
        s["compute_input_tok_s"] = statistics.median(x["input"] / x["compute_s"] for x in timed)
        s["compute_target_tok_s"] = statistics.median(x["target"] / x["compute_s"] for x in timed)
        s["compute_step_s"] = statistics.median(x["compute_s"] for x in timed)
    return s


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def flop_split(gs: dict) -> dict:
    """Rough matmul FLOPs of one gemmalab step: transformer blocks vs the tied LM head + loss.

    Blocks: 6 x (non-embedding parameters) x input tokens. Head: the chunked cross-entropy forms the
    logits of the target positions in forward, again in backward (recompute), plus the two gradient
    matmuls: 4 x 2 x targets x hidden x vocab. Attention score matmuls are left out (short rows).
    """
    import torch
    from gemmalab.config import get_config
    from gemmalab.model import Gemma3

    cfg = get_config("gemma3-270m")
    with torch.device("meta"):
        m = Gemma3(cfg)
    n_embed = m.embed_tokens.weight.numel()
    n_body = sum(p.numel() for p in m.parameters()) - n_embed
    body = 6 * n_body * gs["input_per_step"]
    head = 8 * gs["target_per_step"] * cfg.hidden_size * cfg.vocab_size
    return dict(n_body=n_body, n_embed=n_embed, body=body, head=head, recompute=head / 4)


def describe_machine(machine: dict | None) -> str:
    """One line from `gemmalab.cpu.describe()`: model, flags, bf16, kernels, load."""
    if not machine:
        return cpu_name()
    load = machine.get("load", {})
    running = f", {load['procs_running']} runnable" if "procs_running" in load else ""
    return (f"{machine['cpu']} ({machine['id']}; {', '.join(machine['flags']) or 'no SIMD flags'}); "
            f"bf16 autocast by default: {'yes' if machine['bf16'] else 'no'}; quantized kernels "
            f"{machine['kernels']}; load at start: 1-min average {load.get('loadavg_1m', float('nan')):.2f}"
            f"{running} on {load.get('cores', os.cpu_count())} cores")


def write_report(a, g, t, gs, ts, prof, path: Path, gf: dict | None = None, machine: dict | None = None) -> str:
    """The Markdown report. g/t: gemmalab/TRL results at --autocast; gf: gemmalab fp32 (the baseline)."""
    def spread(r):
        w = [x["wall_s"] for x in r["steps"][a.warmup:]]
        return f"{min(w):.1f}-{max(w):.1f}"

    bf16 = getattr(a, "autocast", "none") == "bf16"
    gfs = summarize(gf, a.warmup) if gf else None
    tag = " (bf16 autocast)" if bf16 else ""
    runs = [("gemmalab" + tag, gs, g)] + ([("gemmalab (fp32)", gfs, gf)] if gf else []) + [
        ("TRL SFTTrainer" + tag, ts, t)]
    ratio = gs["input_tok_s"] / ts["input_tok_s"]
    ratio_t = gs["target_tok_s"] / ts["target_tok_s"]
    ratio_c = gs["input_tok_s"] / ts["compute_input_tok_s"]
    today = datetime.date.today().isoformat()
    flags = " --autocast bf16" if bf16 else ""
    flags += " --with-fp32-baseline" if gf else ""
    lines = [
        "# Training throughput: gemmalab vs transformers + TRL SFTTrainer" + (", bf16 autocast" if bf16 else ""),
        "",
        f"`python bench/bench_sft.py{flags}` on {machine['cpu'] if machine else cpu_name()} "
        f"({platform.machine()}, {os.cpu_count()} cores visible), "
        f"{today}, {a.threads} threads per run; torch {g['torch']}, transformers {t['transformers']}, "
        f"TRL {t['trl']}. Both libraries in the same invocation, one subprocess each, one after the other.",
        "",
        "| library | input tok/s | target tok/s | s/step | input tok/step | target tok/step | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {x['input_tok_s']:.1f} | {x['target_tok_s']:.1f} | {x['step_s']:.2f} | "
              f"{x['input_per_step']:.0f} | {x['target_per_step']:.0f} | {r['peak_rss_mb']:.0f} |"
              for name, x, r in runs]
    lines += [
        "",
        f"**Ratio (gemmalab{' bf16' if bf16 else ''} / TRL{' bf16' if bf16 else ''}), input tokens/s: "
        f"{ratio:.2f}x** (target tokens/s: {ratio_t:.2f}x). Goal: >= 1.5x — {'met' if ratio >= 1.5 else 'not met'}.",
        "",
    ]
    if gf:
        lines += [
            f"**gemmalab bf16 / gemmalab fp32, input tokens/s: {gs['input_tok_s'] / gfs['input_tok_s']:.2f}x** "
            f"(target tokens/s: {gs['target_tok_s'] / gfs['target_tok_s']:.2f}x): what bf16 autocast buys "
            f"gemmalab on this CPU. gemmalab fp32 / TRL bf16: {gfs['input_tok_s'] / ts['input_tok_s']:.2f}x.",
            "",
        ]
    busy = max([g["loadavg"][1], t["loadavg"][1]] + ([gf["loadavg"][1]] if gf else []))
    if busy > a.threads + 0.5:
        lines += [
            f"Caution: other jobs shared the {os.cpu_count()} cores during these runs (1-minute load "
            f"average up to {busy:.1f} for {a.threads} benchmark threads), so absolute step times are "
            f"inflated and noisy (see the per-step table); both libraries ran under similar load, but "
            f"re-run on an idle machine before quoting absolute tokens/s.",
            "",
        ]
    lines += [
        f"Against TRL's compute-only step time (`on_step_begin` -> `on_step_end`, no data loading or "
        f"logging: {ts['compute_input_tok_s']:.1f} input tok/s, {ts['compute_step_s']:.2f} s/step) the ratio "
        f"is {ratio_c:.2f}x.",
        "",
        "## Settings",
        "",
        ("* Model: Gemma 3 270M (the embedded GGUF, dequantized), fp32 master weights, bf16 autocast: "
         "gemmalab `model.autocast = \"bfloat16\"` (the transformer blocks' matmuls in bf16; the chunked "
         "LM-head cross-entropy upcasts to fp32), TRL `bf16=True, use_cpu=True` (accelerate wraps the "
         f"model's forward in `torch.autocast(\"cpu\", torch.bfloat16)`; mixed precision "
         f"`{t.get('mixed_precision')}`)"
         + (", and gemmalab once more in fp32 (`model.autocast = \"none\"`)" if gf else "")
         + "; no activation checkpointing (TRL: `gradient_checkpointing=False`), full fine-tuning."
         if bf16 else
         "* Model: Gemma 3 270M (the embedded GGUF, dequantized), fp32 weights, fp32 compute, no autocast, "
         "no activation checkpointing (TRL: `gradient_checkpointing=False`, `bf16=False`), full fine-tuning."),
        f"* Same weights: transformers `Gemma3ForCausalLM` ({t['attn']} attention) built from "
        f"`config_to_hf` + our state dict; logits on a 6-token prompt differ by at most "
        f"{t['logits_max_abs_diff']:.1e} (same argmax everywhere: {t['same_top1']}).",
        f"* Data: {t['records']} chat records from CPython {platform.python_version()} stdlib docstrings "
        f"(user: \"Explain `module.name`.\", assistant: the docstring, 80-700 characters); "
        f"{t['records_fit_seq_len']}/{t['records']} fit in one row. transformers' tokenizer (from the same "
        f"GGUF, with the Gemma 3 chat template) gives the same token ids as gemmalab's for "
        f"{t['records_same_ids']}/{t['records']} records. Trained tokens over the data set: gemmalab "
        f"{t['dataset_targets_gemmalab']}, TRL {t['dataset_targets_trl']}"
        + (" (TRL's Gemma 3 training template also trains the \"\\n\" after each `<end_of_turn>`, "
           "one token per record; gemmalab stops at `<end_of_turn>`)."
           if t["dataset_targets_trl"] == t["dataset_targets_gemmalab"] + t["records"] else "."),
        f"* Rows of {a.seq_len} tokens, {a.batch_size} rows per step, gradient accumulation 1, "
        f"{a.warmup} warm-up steps then {a.steps} timed steps (median reported); AdamW lr {a.lr:g}, "
        f"weight decay 0, grad clip 1.0.",
        f"* gemmalab: `gemmalab.train.recipes.sft.train_sft`, packed rows (first-fit, per-document attention via "
        f"segment ids, padding at row ends: {gs['input_per_step']:.0f} real of "
        f"{a.batch_size * a.seq_len} slots per step), loss {g['loss_mask']}, chunked cross-entropy, "
        f"{g['optimizer']}.",
        f"* TRL: `SFTTrainer`, `packing=True` (strategy `{t['packing_strategy']}`, padding-free: "
        f"{t['padding_free']}; transformers builds a per-document mask from `position_ids`), loss "
        f"{t['loss_mask']}, TRL's fused (chunked) LM-head loss, optimizer `{t['optimizer']}`"
        + (f". assistant_only_loss failed: `{t['fallback_error']}`" if t.get("fallback_error") else "")
        + ".",
        "* Tokens/s = tokens of the step / wall time between the ends of consecutive optimizer steps; "
        "'input' counts real tokens (no padding), 'target' the trained ones. Model loading, dataset "
        "preparation and warm-up are excluded. Peak RSS is each subprocess's `ru_maxrss` (includes "
        "loading; TRL's also holds gemmalab's copy of the weights during the logits check).",
        f"* CPU: {describe_machine(machine)} (`gemmalab.cpu.describe()`, recorded in the results).",
        f"* The machine is shared: 1-minute load average before/after the gemmalab run "
        f"{g['loadavg'][0]:.1f}/{g['loadavg'][1]:.1f}"
        + (f", the gemmalab fp32 run {gf['loadavg'][0]:.1f}/{gf['loadavg'][1]:.1f}" if gf else "")
        + f", the TRL run {t['loadavg'][0]:.1f}/{t['loadavg'][1]:.1f} "
        f"(each run itself keeps {a.threads} threads busy).",
        "",
        f"Per-step times (s), warm-up included; timed steps range {spread(g)} s (gemmalab{' bf16' if bf16 else ''})"
        + (f", {spread(gf)} s (gemmalab fp32)" if gf else "") + f" and {spread(t)} s (TRL{' bf16' if bf16 else ''}):",
        "",
        "| step | " + " | ".join(str(x["step"]) for x in g["steps"]) + " |",
        "|---|" + "---|" * len(g["steps"]),
        f"| gemmalab{' bf16' if bf16 else ''} | " + " | ".join(f"{x['wall_s']:.2f}" for x in g["steps"]) + " |",
    ]
    if gf:
        lines.append("| gemmalab fp32 | " + " | ".join(f"{x['wall_s']:.2f}" for x in gf["steps"]) + " |")
    lines += [
        f"| TRL{' bf16' if bf16 else ''} | " + " | ".join(f"{x['wall_s']:.2f}" for x in t["steps"]) + " |",
        "",
    ]
    if prof:
        lines += ["## Where the time goes (one gemmalab step)", "",
                  f"Phases of one step ({a.batch_size} x {a.seq_len} tokens), timed in a separate process:", "",
                  "| phase | s |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in prof["phases"].items()]
        lines += ["", "The optimizer step alone (same parameters, state already created), torch AdamW's "
                  "three code paths:", "", "| AdamW | s/step |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in prof["adamw"].items()]
        lines += ["", "torch.profiler, one step, top ops by self CPU time:", "", "```",
                  prof["table"].rstrip(), "```", ""]
        f = flop_split(gs)
        total = f["body"] + f["head"]
        ad = prof["adamw"]
        loop, fused = ad.get("for-loop (torch default on CPU)"), ad.get("fused=True")
        lines += [
            "### Reading", "",
            "* The step is matmul-bound: `aten::mm` / `aten::addmm_` lead the profile, and backward is the "
            f"largest phase. Both libraries run the same {'bf16 (autocast) block' if bf16 else 'fp32'} "
            "matmuls through the same torch CPU kernels, "
            "and TRL 1.16 already avoids full logits (fused, chunked LM-head loss) and uses fused AdamW, "
            "so there is little overhead on TRL's side to win back; 1.5x has to come from doing less work.",
            f"* Rough matmul FLOPs per step: transformer blocks {f['body'] / 1e9:.0f} GFLOP "
            f"(6 x {f['n_body'] / 1e6:.0f}M non-embedding parameters x {gs['input_per_step']:.0f} tokens), "
            f"LM head + loss {f['head'] / 1e9:.0f} GFLOP (262,144-entry vocabulary x "
            f"{gs['target_per_step']:.0f} target tokens, 4 matmuls: forward, the backward's recompute, two "
            f"gradients) = {100 * f['head'] / total:.0f}% of the step. Computing the head's gradients in "
            f"the forward pass (Liger-style fused linear cross-entropy: the loss is the last op, so the "
            f"backward only scales them) drops the recompute, {f['recompute'] / 1e9:.0f} GFLOP "
            f"(~{100 * f['recompute'] / total:.0f}% of the step).",
        ]
        if isinstance(loop, float) and isinstance(fused, float) and "for-loop" in g["optimizer"]:
            lines.append(
                f"* This run's `make_optimizer` built a default `torch.optim.AdamW`, which takes the "
                f"per-parameter for-loop path on CPU: {loop:.2f} s/step against {fused:.2f} s with "
                f"`fused=True` (what TRL uses), ~{100 * (loop - fused) / gs['step_s']:.0f}% of a measured "
                f"step. The for-loop path also allocates full-size temporaries per parameter (the "
                f"168M-entry embedding), part of gemmalab's higher peak RSS.")
        has_bf16 = machine["bf16"] if machine else False
        if not bf16:
            lines.append(
                "* This CPU has native bf16, where gemmalab's `model.autocast = \"auto\"` trains with bf16 "
                "autocast; this comparison pins fp32 for both libraries (`--autocast bf16 "
                "--with-fp32-baseline` measures bf16)." if has_bf16 else
                "* This CPU has no native bf16 (AVX512_BF16 / AMX-BF16), so fp32 is what gemmalab trains in "
                "by default here.")
        else:
            lines.append(
                "* Under bf16 autocast the blocks' matmuls run in bf16"
                + (" on the CPU's native bf16 dot products" if has_bf16 else
                   " without native bf16 dot products on this CPU (converted to fp32 for the math)")
                + "; gemmalab's chunked LM-head loss stays fp32 (it upcasts), so the head's share of the "
                "FLOPs above is not sped up.")
        lines.append("")
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--autocast", choices=sorted(GEMMALAB_AUTOCAST), default="none",
                    help="'none': both libraries in fp32 (the default); 'bf16': both with bf16 autocast over\n"
                         "fp32 master weights (gemmalab model.autocast='bfloat16', TRL bf16=True)")
    ap.add_argument("--with-fp32-baseline", action="store_true",
                    help="with --autocast bf16: also run gemmalab in fp32, for the bf16 / fp32 ratio")
    ap.add_argument("--workdir", default=None, help="data and run outputs (default: a temp directory)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "training.md"))
    ap.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                    help="profile one gemmalab step ('auto': when the ratio is below 1.5x)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite --out from the results already in --workdir (no training)")
    ap.add_argument("--child", choices=["gemmalab", "trl", "profile"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:
        fn = {"gemmalab": child_gemmalab, "trl": child_trl, "profile": child_profile}[a.child]
        Path(a.result).write_text(json.dumps(fn(a)))
        return

    missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        print(INSTALL_HINT, file=sys.stderr)
        sys.exit(2)

    keys = ("records", "seq_len", "batch_size", "warmup", "steps", "lr", "threads", "autocast",
            "with_fp32_baseline")
    gf = None
    if a.report_only:
        if not a.workdir:
            raise SystemExit("--report-only needs --workdir (a previous run's work directory)")
        wd = Path(a.workdir)
        settings = json.loads((wd / "settings.json").read_text())
        settings.setdefault("autocast", "none")  # results from before --autocast were fp32
        settings.setdefault("with_fp32_baseline", False)
        for k, v in settings.items():
            setattr(a, k, v)
        g, t = (json.loads((wd / f"result_{n}.json").read_text()) for n in ("gemmalab", "trl"))
        if a.with_fp32_baseline:
            gf = json.loads((wd / "result_gemmalab_fp32.json").read_text())
        prof_file = wd / "result_profile.json"
        prof = json.loads(prof_file.read_text()) if prof_file.exists() else None
        machine_file = wd / "machine.json"
        machine = json.loads(machine_file.read_text()) if machine_file.exists() else g.get("cpu")
        gs, ts = summarize(g, a.warmup), summarize(t, a.warmup)
        ratio = gs["input_tok_s"] / ts["input_tok_s"]
    else:
        if a.with_fp32_baseline and a.autocast != "bf16":
            raise SystemExit("--with-fp32-baseline is the fp32 reference of a bf16 run: add --autocast bf16")
        if str(ROOT) not in sys.path:  # the children get it through PYTHONPATH
            sys.path.insert(0, str(ROOT))
        from gemmalab.cpu import describe

        a.workdir = a.workdir or tempfile.mkdtemp(prefix="bench_sft_")
        Path(a.workdir).mkdir(parents=True, exist_ok=True)
        (Path(a.workdir) / "settings.json").write_text(json.dumps({k: getattr(a, k) for k in keys}))
        machine = describe()
        (Path(a.workdir) / "machine.json").write_text(json.dumps(machine, indent=2))
        print(f"cpu: {describe_machine(machine)}", flush=True)
        records = make_records(a.records)
        with open(Path(a.workdir) / "data.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        print(f"data: {len(records)} records -> {a.workdir}/data.jsonl", flush=True)

        g = run_child("gemmalab", a, machine=machine)
        if a.with_fp32_baseline:
            gf = run_child("gemmalab", a, autocast="none", name="gemmalab_fp32", machine=machine)
        t = run_child("trl", a, machine=machine)
        gs, ts = summarize(g, a.warmup), summarize(t, a.warmup)
        ratio = gs["input_tok_s"] / ts["input_tok_s"]
        prof = None
        if a.profile == "always" or (a.profile == "auto" and ratio < 1.5):
            prof = run_child("profile", a)

    bf16 = a.autocast == "bf16"
    gfs = summarize(gf, a.warmup) if gf else None
    print()
    if machine:
        print(f"cpu: {machine['cpu']}; load at start {machine['load'].get('loadavg_1m', float('nan')):.2f} "
              f"(1-min average, {machine['load'].get('cores')} cores); precision: "
              f"{'bf16 autocast' if bf16 else 'fp32'}")
    print(f"{'library':<15} {'input tok/s':>12} {'target tok/s':>13} {'s/step':>7} {'peak RSS MB':>12}")
    rows = [("gemmalab" + (" bf16" if bf16 else ""), gs, g)] + ([("gemmalab fp32", gfs, gf)] if gf else []) \
        + [("TRL" + (" bf16" if bf16 else ""), ts, t)]
    for name, s, r in rows:
        print(f"{name:<15} {s['input_tok_s']:>12.1f} {s['target_tok_s']:>13.1f} {s['step_s']:>7.2f} "
              f"{r['peak_rss_mb']:>12.0f}")
    print(f"ratio (gemmalab / TRL{', both bf16' if bf16 else ''}): {ratio:.2f}x input tokens/s, "
          f"{gs['target_tok_s'] / ts['target_tok_s']:.2f}x target tokens/s; "
          f"vs TRL compute-only: {gs['input_tok_s'] / ts['compute_input_tok_s']:.2f}x")
    if gf:
        print(f"ratio (gemmalab bf16 / gemmalab fp32): {gs['input_tok_s'] / gfs['input_tok_s']:.2f}x input "
              f"tokens/s, {gs['target_tok_s'] / gfs['target_tok_s']:.2f}x target tokens/s")
    print(f"TRL loss mask: {t['loss_mask']}; logits max |diff| {t['logits_max_abs_diff']:.1e}")
    if prof:
        print("\nwhere the time goes (one gemmalab step):")
        for k, v in prof["phases"].items():
            print(f"  {k:<28} {v:6.2f} s")
        for k, v in prof["adamw"].items():
            print(f"  AdamW {k:<22} {v:6.2f} s" if isinstance(v, float) else f"  AdamW {k:<22} {v}")
    write_report(a, g, t, gs, ts, prof, Path(a.out), gf=gf, machine=machine)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
