"""Reward-model training step: `gemmalab train rm` vs TRL's `RewardTrainer`, same backbone, pairs,
batches, LoRA, optimizer and machine, in one invocation.

    pip install -c constraints.txt trl datasets peft   # only for this benchmark; gemmalab never imports them
    python bench/bench_rm.py [--steps 6] [--warmup 2] [--batch 4] [--seq-len 256] [--threads 2]
                             [--variants lora,head] [--precision auto] [--out docs/reward_models.md]
    python bench/bench_rm.py --report-only --workdir DIR       # rewrite the report from DIR/results.json

Model: the embedded Gemma 3 270M (fp32 master weights) + a scalar head read at each row's last token.
gemmalab runs its own recipe (`load_recipe_config("rm", CONFIG)` + `run_recipe`, what `gemmalab train
rm CONFIG` does; the config files are kept in the work directory). TRL trains transformers'
`Gemma3TextForSequenceClassification` whose backbone is bench_sft.build_hf_model's (our state dict in
transformers' classes) and whose `score` head is gemmalab's initial head; the two models' scores of
the first batch are compared before any timing (and again after peft wraps TRL's model).

Same everything that can be the same:
  * pairs: a JSONL of {prompt, chosen, rejected} made offline from CPython docstrings
    (bench_sft.make_records; prompt "Explain `module.name`.", chosen its docstring, rejected the
    docstring of another object, seeded), both completions cut at a word so that their rows fit
    --seq-len and have about the same token length (no length shortcut for the model);
  * rows: gemmalab's chat template (`rm.template = "chat"`: user turn, generation prompt, completion,
    <end_of_turn>, scored at that last token). TRL gets the very same token ids as a pre-tokenized
    dataset (`chosen_ids` / `rejected_ids`), in the same order (gemmalab's PairDataset order replayed,
    TRL `train_sampling_strategy="sequential"`), so every step sees the same rows padded to the same
    length; both sides' per-step shapes are checked against that schedule;
  * variants: "lora" (r = 16, alpha = 16, dropout 0, on q/k/v/o/gate/up/down; TRL through peft with
    `modules_to_save=["score"]`, its lora_A set to gemmalab's seeded A, B = 0 on both), "head"
    (linear probing: only the head trains), "top_blocks" (the top --top-blocks blocks + final norm +
    head); full fine-tuning is not compared: `gemmalab train rm` has no such mode;
  * the head starts at gemmalab's `rm.init_seed` head on both sides, so step 1 has the same loss;
  * AdamW (lr --lr constant, no warm-up, weight decay 0, betas 0.9/0.999, eps 1e-8), grad clip 1.0,
    grad accumulation 1, no activation checkpointing (TRL's RewardConfig turns it on by default),
    --threads threads;
  * precision: "fp32" (gemmalab `model.autocast = "none"`, TRL `bf16=False`) and, where the CPU has
    native bf16 (AVX512_BF16 / AMX-BF16; `--precision auto`), "bf16": bf16 autocast over fp32 master
    weights (gemmalab `model.autocast = "bfloat16"`, TRL `bf16=True, use_cpu=True`, i.e. accelerate's
    `torch.autocast("cpu", torch.bfloat16)`); what each side used is recorded.

Timing: each run is its own subprocess (peak RSS is its own), one after the other. A step is the wall
time between the ends of consecutive optimizer steps (gemmalab: a hook added to train_loop's `hooks`,
the only thing this script adds to `train rm`; TRL: `TrainerCallback.on_step_end`). The first
--warmup steps are dropped, the median of the next --steps is reported: steps/s, pairs/s, real tokens/s.
Peak RSS: the process's `ru_maxrss` (model loading included; TRL's child also holds gemmalab's copy of
the model during the checks) and the steady-state peak of the timed steps (VmHWM, reset through
/proc/self/clear_refs at the end of the warm-up). CPU model, flags, kernels, torch's CPU capability
and the machine load before / after each run are recorded (gemmalab.cpu.describe()).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench_sft  # noqa: E402  (make_records, build_hf_model, describe_machine)
from docs_section import replace_section  # noqa: E402

BEGIN, END = "<!-- BEGIN bench_rm -->", "<!-- END bench_rm -->"
INSTALL_HINT = ("bench_rm.py compares against TRL's RewardTrainer (with peft for LoRA), not installed here.\n"
                "Install them (benchmark-only dependencies, never needed by gemmalab):\n"
                "    pip install -c constraints.txt trl datasets peft")
VARIANTS = ("lora", "head", "top_blocks")
PRECISIONS = ("fp32", "bf16")
AUTOCAST = {"fp32": "none", "bf16": "bfloat16"}  # precision -> gemmalab model.autocast
TEMPLATE = "chat"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------------
# Pairs and the step schedule (parent)

def _fit(tokenizer, prompt: str, text: str, budget: int) -> tuple[str, int] | None:
    """The longest word prefix of `text` whose row (gemmalab's encode) has <= budget tokens."""
    from gemmalab.train.rewards.model import encode

    words = re.findall(r"\S+\s*", text)
    size = lambda k: len(encode(tokenizer, prompt, "".join(words[:k]).rstrip(), TEMPLATE, 10 ** 9))  # noqa: E731
    if not words or size(1) > budget:
        return None
    lo, hi = 1, len(words)  # size(lo) <= budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid - 1)
    return "".join(words[:lo]).rstrip(), size(lo)


def make_pairs(n: int, seq_len: int, tokenizer, seed: int = 0) -> list[dict]:
    """`n` preference pairs: chosen = the object's docstring, rejected = another object's, both cut
    at a word to fit `seq_len` and to about the shorter one's token length."""
    records = bench_sft.make_records(max(2 * n, 64))
    rng = random.Random(seed)
    pairs = []
    for i, rec in enumerate(records):
        prompt, chosen = rec["messages"][0]["content"], rec["messages"][1]["content"]
        rejected = records[(i + rng.randrange(1, len(records))) % len(records)]["messages"][1]["content"]
        c, r = _fit(tokenizer, prompt, chosen, seq_len), _fit(tokenizer, prompt, rejected, seq_len)
        if c is None or r is None:
            continue
        budget = min(c[1], r[1])  # the longer completion is cut to the shorter one's row length
        c, r = _fit(tokenizer, prompt, c[0], budget), _fit(tokenizer, prompt, r[0], budget)
        if c is None or r is None:
            continue
        pairs.append({"prompt": prompt, "chosen": c[0], "rejected": r[0]})
        if len(pairs) == n:
            return pairs
    raise SystemExit(f"only {len(pairs)} pairs fit in {seq_len} tokens, {n} asked (raise --seq-len)")


def make_schedule(pairs_file: Path, tokenizer, batch: int, seq_len: int, steps: int) -> list[list]:
    """The (chosen ids, rejected ids) of every optimizer step, in the order `train rm` visits them:
    gemmalab's own encode_pairs and PairDataset (seed 0 = run.seed), one micro-batch per step."""
    from gemmalab.train.recipes.rm import PairDataset, encode_pairs, read_pairs

    class Order(PairDataset):  # the pairs themselves instead of their tensors
        def batch(self, items):
            return [(c, r) for c, r, _, _ in items]

    encoded = encode_pairs(read_pairs([str(pairs_file)]), tokenizer, TEMPLATE, seq_len)
    stream = iter(Order(encoded, batch, seed=0, pad_id=tokenizer.pad_id))
    return [next(stream) for _ in range(steps)]


def schedule_shapes(schedule: list[list]) -> list[dict]:
    """Per step: real tokens and the padded batch shape (2B rows x longest row), what both sides must see."""
    out = []
    for items in schedule:
        rows = [seq for c, r in items for seq in (c, r)]
        out.append({"tokens": sum(map(len, rows)), "shape": [len(rows), max(map(len, rows))]})
    return out


# ---------------------------------------------------------------------------------------------------
# Children (one library, one variant, one precision per process)

def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so what a child freed before the timed steps
    (TRL's: gemmalab's copy of the model used by the checks) does not count as resident."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0), the heap trimmed first
    (the same on both sides)."""
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        m = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) / 1024 if m else float("nan")
    except OSError:
        return float("nan")


def _process_peak_rss_mb() -> float:
    """ru_maxrss so far; the VmHWM reset resets it too, so children read it before resetting."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rm_config(a, variant: str, precision: str, out_dir: Path) -> dict:
    """The `gemmalab train rm` config of one run (TRL's child builds its initial head and LoRA A
    from the same config)."""
    total = a.warmup + a.steps
    return {"model": {"dtype": "float32", "autocast": AUTOCAST[precision], "activation_checkpointing": False},
            "data": {"train": [str(Path(a.workdir) / "pairs.jsonl")], "seq_len": a.seq_len, "batch_size": a.batch},
            "optim": {"lr": a.lr, "warmup_steps": 0, "min_lr_ratio": 1.0, "weight_decay": 0.0,
                      "betas": [0.9, 0.999], "eps": 1e-8, "grad_clip": 1.0, "grad_accum": 1},
            "lora": {"rank": a.lora_rank, "alpha": float(a.lora_rank), "targets": LORA_TARGETS},
            "run": {"out_dir": str(out_dir), "steps": total, "log_every": 1, "save_every": total + 1,
                    "threads": a.threads, "device": "cpu", "seed": 0},
            "rm": {"trainable": variant, "top_blocks": a.top_blocks, "template": TEMPLATE, "init_seed": 0,
                   "head_std": 0.02}}


def _load_cfg(a, variant: str, precision: str, out_dir: Path, suffix: str = ""):
    """The checked config (as `gemmalab train rm FILE` reads it) and its file in the work directory."""
    from gemmalab.train.recipes import load_recipe_config

    path = Path(a.workdir) / f"rm_{variant}_{precision}{suffix}.json"
    path.write_text(json.dumps(rm_config(a, variant, precision, out_dir), indent=2))
    return load_recipe_config("rm", path), path


def _torch_facts() -> dict:
    import torch
    return {"torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "mkldnn": bool(torch.backends.mkldnn.is_available())}


def child_gemmalab(a) -> dict:
    """`gemmalab train rm CONFIG` in-process, with a step hook for timing and the RSS reset."""
    import torch

    import gemmalab.train.trainer as trainer_mod
    from gemmalab.train.recipes import run_recipe

    torch.set_num_threads(a.threads)
    total = a.warmup + a.steps
    out = Path(a.workdir) / f"gemmalab_{a.variant}_{a.precision}"
    cfg, cfg_path = _load_cfg(a, a.variant, a.precision, out)
    _, amp_note = trainer_mod.autocast_choice(cfg, torch.device("cpu"))
    ends: dict[int, float] = {}
    seen: list[dict] = []
    rss: dict = {}
    trainable: dict = {}

    def hook(model, step):  # after every optimizer step, before logging / checkpointing
        ends[step] = time.perf_counter()
        if step == a.warmup:
            rss["before_reset"], rss["reset"] = _process_peak_rss_mb(), _reset_peak_rss()
        if step == total:
            rss["steady"] = _peak_rss_mb()

    original = trainer_mod.train_loop

    def timed_train_loop(cfg, model, data, loss_fn, **kw):
        def counting_loss(m, b, n):  # the shapes train rm really trained on
            seen.append({"tokens": int((b["segment_ids"] >= 0).sum()),
                         "shape": [int(b["input_ids"].shape[0]) * 2, int(b["input_ids"].shape[-1])]})
            return loss_fn(m, b, n)
        trainable["params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ends[0] = time.perf_counter()
        if a.warmup == 0:
            rss["before_reset"], rss["reset"] = _process_peak_rss_mb(), _reset_peak_rss()
        return original(cfg, model, data, counting_loss, hooks=tuple(kw.pop("hooks", ())) + (hook,), **kw)

    trainer_mod.train_loop = timed_train_loop  # train_rm imports it at call time
    t0 = time.perf_counter()
    try:
        run_recipe("rm", cfg, progress=False)
    finally:
        trainer_mod.train_loop = original
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [dict(step=i, wall_s=ends[i] - ends[i - 1], tokens=seen[i - 1]["tokens"],
                  shape=seen[i - 1]["shape"], loss=rows[i - 1]["loss"], accuracy=rows[i - 1].get("accuracy"),
                  grad_norm=rows[i - 1].get("grad_norm"))
             for i in range(1, total + 1)]
    meta = json.loads((out / "reward_model.json").read_text())
    return dict(library="gemmalab", variant=a.variant, precision=a.precision, steps=steps, run_s=wall,
                peak_rss_mb=max(rss.get("before_reset", 0.0), _process_peak_rss_mb()), steady_rss_mb=rss.get("steady"),
                rss_reset=rss.get("reset", False), autocast=cfg.model.autocast, amp_note=amp_note,
                reward_dtype="head output float32 (RewardHead computes in fp32, also under autocast)",
                trainable=meta["trainable"], trainable_params=trainable["params"], config=str(cfg_path),
                optimizer=bench_sft.describe_optimizer(cfg), **_torch_facts())


def child_trl(a) -> dict:
    """trl.RewardTrainer on our weights and our initial head / LoRA A, over the replayed schedule."""
    import copy
    from types import SimpleNamespace

    import torch
    import transformers
    import trl
    from datasets import Dataset

    from gemmalab._paths import default_model_path
    from gemmalab.train.lora import lora_modules, merge_lora
    from gemmalab.train.recipes.rm import build_reward_model
    from gemmalab.train.rewards.model import rows_batch

    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    total = a.warmup + a.steps
    cfg, _ = _load_cfg(a, a.variant, a.precision, Path(a.workdir) / f"trl_{a.variant}_{a.precision}_init",
                       suffix="_trl_init")
    schedule = json.loads((Path(a.workdir) / "schedule.json").read_text())
    if len(schedule) < total:
        raise RuntimeError(f"schedule.json holds {len(schedule)} steps, {total} needed")
    schedule = schedule[:total]
    first_rows = [seq for c, r in schedule[0] for seq in (c, r)]  # chosen, rejected, chosen, ...

    # gemmalab's initial reward model: the same head (and LoRA A) this run of `train rm` starts from
    g_model, g_tok, _ = build_reward_model(cfg, torch.device("cpu"))
    head_w = g_model.head.weight.detach().clone()
    lora_a = {k: m.lora_a.detach().clone() for k, m in lora_modules(g_model.backbone).items()}
    b = rows_batch(first_rows, g_tok.pad_id)
    g_model.eval()
    with torch.no_grad():
        g_scores = g_model.scores(b["input_ids"], b["positions"], b["segment_ids"], b["last_index"]).float()
    if lora_a:
        merge_lora(g_model.backbone)  # B = 0: W + 0 = W exactly, plain nn.Linear names again

    # the same weights in transformers' sequence-classification class
    hf_causal, unused = bench_sft.build_hf_model(SimpleNamespace(model=g_model.backbone))
    pad_id = int(g_tok.pad_id)
    del g_model
    _trim_heap()
    hf_cfg = hf_causal.config
    hf_cfg.num_labels = 1
    hf_cfg.pad_token_id = pad_id
    try:
        with torch.device("meta"):
            seq = transformers.Gemma3TextForSequenceClassification(hf_cfg)
    except Exception:  # noqa: BLE001 - a full (random) init instead; its weights are replaced below
        seq = transformers.Gemma3TextForSequenceClassification(copy.deepcopy(hf_cfg))
    seq.model = hf_causal.model
    seq.score = torch.nn.Linear(hf_cfg.hidden_size, 1, bias=False)
    with torch.no_grad():
        seq.score.weight.copy_(head_w)
    seq.config = hf_cfg
    del hf_causal
    gc.collect()

    def hf_scores(model) -> torch.Tensor:
        ids = b["input_ids"]
        mask = (b["segment_ids"] >= 0).long()
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.squeeze(-1).float()
        model.train(was)
        return out

    scale = float(g_scores.abs().max().clamp_min(1.0))
    diff = float((hf_scores(seq) - g_scores).abs().max())
    if diff > 1e-3 * scale:
        raise RuntimeError(f"gemmalab and transformers initial scores differ by {diff:.2e} (scores up to {scale:.2f})")

    # transformers' tokenizer of the same GGUF (TRL needs it: pad token, and its own data path below)
    path = default_model_path()
    t0 = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok_load_s = time.perf_counter() - t0
    if tok.pad_token_id != pad_id:
        raise RuntimeError(f"transformers' pad id {tok.pad_token_id}, gemmalab's {pad_id}")
    template_src = "the GGUF's chat template"
    if not getattr(tok, "chat_template", None):
        from trl.chat_template_utils import gemma3_chat_template
        tok.chat_template, template_src = gemma3_chat_template, "TRL's gemma3 chat template (the GGUF holds none)"

    # what trains
    peft_config = None
    if a.variant == "lora":
        import peft
        peft_config = peft.LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                      target_modules=list(cfg.lora.targets), bias="none", task_type="SEQ_CLS",
                                      modules_to_save=["score"])
    else:
        seq.model.requires_grad_(False)
        if a.variant == "top_blocks":
            n = len(seq.model.layers)
            for layer in seq.model.layers[n - cfg.rm.top_blocks:]:
                layer.requires_grad_(True)
            seq.model.norm.requires_grad_(True)
        seq.score.requires_grad_(True)
    seq.train()

    ends: dict[int, float] = {}
    seen: list[dict] = []
    rss: dict = {}

    class StepTimer(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends[0] = time.perf_counter()
            if a.warmup == 0:
                rss["before_reset"], rss["reset"] = _process_peak_rss_mb(), _reset_peak_rss()

        def on_step_end(self, args, state, control, **kw):
            ends[state.global_step] = time.perf_counter()
            if state.global_step == a.warmup:
                rss["before_reset"], rss["reset"] = _process_peak_rss_mb(), _reset_peak_rss()
            if state.global_step == total:
                rss["steady"] = _peak_rss_mb()

    class CountingRewardTrainer(trl.RewardTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            if model.training:
                r = outputs.logits.squeeze(-1).detach()
                rc, rr = torch.chunk(r, 2)
                seen.append({"tokens": int(inputs["attention_mask"].sum()), "shape": list(inputs["input_ids"].shape),
                             "loss": float(loss.detach()), "accuracy": float((rc > rr).float().mean()),
                             "reward_dtype": str(outputs.logits.dtype).removeprefix("torch."),
                             "score_dtype": sorted(score_dtypes)})
            return (loss, outputs) if return_outputs else loss

    args = trl.RewardConfig(
        output_dir=str(Path(a.workdir) / f"trl_{a.variant}_{a.precision}"), per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1, learning_rate=a.lr, lr_scheduler_type="constant", weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, max_steps=total,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=a.precision == "bf16", fp16=False,
        gradient_checkpointing=False, seed=0, dataloader_num_workers=0, disable_tqdm=True,
        train_sampling_strategy="sequential", max_length=a.seq_len, center_rewards_coefficient=None)
    data = Dataset.from_list([{"chosen_ids": c, "rejected_ids": r} for items in schedule for c, r in items])
    trainer = CountingRewardTrainer(model=seq, args=args, train_dataset=data, processing_class=tok,
                                    peft_config=peft_config, callbacks=[StepTimer()])
    if len(trainer.train_dataset) != len(data):
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(data)} pairs (max_length filter)")

    copied = 0
    if lora_a:  # gemmalab's seeded A into peft's lora_A (B is zero on both sides)
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                m = re.search(r"(layers\.\d+\..+)\.lora_A\.default\.weight$", name)
                if m:
                    p.copy_(lora_a[m.group(1)])
                    copied += 1
                elif ".lora_B." in name and p.abs().max() != 0:
                    raise RuntimeError(f"peft's {name} does not start at zero")
        if copied != len(lora_a):
            raise RuntimeError(f"copied {copied} LoRA A matrices into peft's model, gemmalab has {len(lora_a)}")
    score_dtypes: set[str] = set()  # the head's own output dtype (under autocast: bf16)
    for name, mod in trainer.model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "score" in name.split("."):
            mod.register_forward_hook(lambda m, i, o: score_dtypes.add(str(o.dtype).removeprefix("torch.")))
    diff_wrapped = float((hf_scores(trainer.model) - g_scores).abs().max())
    if diff_wrapped > 1e-3 * scale:
        raise RuntimeError(f"TRL's wrapped model scores differ from gemmalab's by {diff_wrapped:.2e}")
    score_dtypes.clear()  # that check ran in fp32 outside the trainer
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    # TRL's own data path on the same pairs (conversational records), for the report: not trained on
    raw = [json.loads(x) for x in (Path(a.workdir) / "pairs.jsonl").read_text().splitlines()]
    conv = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                               "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in raw])
    g_ids = json.loads((Path(a.workdir) / "encoded.json").read_text())
    native_args = copy.copy(args)
    native_args.max_length = None  # no filtering: compare every pair
    native = trainer._prepare_dataset(conv, tok, native_args, "native check")
    native_same = sum(n["chosen_ids"] == g[0] and n["rejected_ids"] == g[1] for n, g in zip(native, g_ids))
    extra = [len(n["chosen_ids"]) - len(g[0]) for n, g in zip(native, g_ids)]
    last_tokens = sorted({tok.convert_ids_to_tokens(n["chosen_ids"][-1]) for n in native})
    del native, conv

    trainer.train()
    steps = [dict(step=i, wall_s=ends[i] - ends[i - 1], tokens=seen[i - 1]["tokens"], shape=seen[i - 1]["shape"],
                  loss=seen[i - 1]["loss"], accuracy=seen[i - 1]["accuracy"])
             for i in range(1, total + 1)]
    opt = trainer.args.optim
    return dict(library="trl", variant=a.variant, precision=a.precision, steps=steps,
                peak_rss_mb=max(rss.get("before_reset", 0.0), _process_peak_rss_mb()), steady_rss_mb=rss.get("steady"), rss_reset=rss.get("reset", False),
                bf16_arg=bool(trainer.args.bf16), mixed_precision=str(getattr(trainer.accelerator, "mixed_precision", None)),
                reward_dtype=(f"head (`score`) output {'/'.join(seen[0]['score_dtype'])}, rewards "
                              f"{seen[0]['reward_dtype']} at the loss (accelerate converts outputs to fp32)"),
                trainable_params=n_train, lora_a_copied=copied,
                initial_score_max_abs_diff=diff, initial_score_max_abs_diff_wrapped=diff_wrapped,
                initial_score_scale=scale, unused_gemmalab_tensors=unused, attn=seq.model.config._attn_implementation,
                optimizer=str(getattr(opt, "value", opt)), gradient_checkpointing=bool(trainer.args.gradient_checkpointing),
                tokenizer_load_s=tok_load_s, chat_template=template_src,
                native_same_ids=native_same, native_checked=len(g_ids), native_extra_tokens=sorted(set(extra)),
                native_last_tokens=last_tokens, trl=trl.__version__, transformers=transformers.__version__,
                peft=_version("peft"), **_torch_facts())


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------------------------------
# Parent

def run_child(kind: str, a, variant: str, precision: str) -> dict:
    from gemmalab.cpu import machine_load

    name = f"{kind}_{variant}_{precision}"
    result = Path(a.workdir) / f"result_{name}.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRL_EXPERIMENTAL_SILENCE="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--variant", variant,
           "--precision", precision, "--result", str(result), "--workdir", a.workdir,
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch),
           "--seq-len", str(a.seq_len), "--threads", str(a.threads), "--lr", str(a.lr),
           "--lora-rank", str(a.lora_rank), "--top-blocks", str(a.top_blocks)]
    print(f"[{name}] running ...", flush=True)
    load_before, t0 = machine_load(), time.perf_counter()
    with open(Path(a.workdir) / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=a.child_timeout)
    load_after = machine_load()
    if proc.returncode != 0 or not result.exists():
        tail = (Path(a.workdir) / f"{name}.log").read_text()[-6000:]
        raise SystemExit(f"[{name}] failed (exit {proc.returncode}):\n{tail}")
    out = json.loads(result.read_text())
    out.update(process_s=time.perf_counter() - t0, load=dict(before=load_before, after=load_after))
    result.write_text(json.dumps(out))
    print(f"[{name}] done in {out['process_s']:.0f} s", flush=True)
    return out


def summarize(res: dict, warmup: int, batch: int) -> dict:
    timed = res["steps"][warmup:]
    step_s = statistics.median(x["wall_s"] for x in timed)
    tokens = statistics.mean(x["tokens"] for x in timed)  # the same on both sides (checked)
    return dict(step_s=step_s, steps_per_s=1 / step_s, pairs_per_s=batch / step_s, tok_s=tokens / step_s,
                tokens_per_step=tokens,
                loss_first=res["steps"][0]["loss"], loss_last=res["steps"][-1]["loss"])


def compare(g: dict, t: dict, shapes: list[dict], batch: int, warmup: int) -> dict:
    """Ratios (gemmalab / TRL) and the sanity checks of one variant x precision."""
    for lib in (g, t):
        got = [{"tokens": s["tokens"], "shape": s["shape"]} for s in lib["steps"]]
        if got != shapes[:len(got)]:
            raise SystemExit(f"{lib['library']} {lib['variant']} {lib['precision']}: its batches differ from "
                             f"the schedule (first: {got[0]} vs {shapes[0]})")
    gs, ts = summarize(g, warmup, batch), summarize(t, warmup, batch)
    losses = [(x["loss"], y["loss"]) for x, y in zip(g["steps"], t["steps"])]
    return dict(gemmalab=gs, trl=ts, steps_per_s=gs["steps_per_s"] / ts["steps_per_s"],
                steady_rss=(g["steady_rss_mb"] / t["steady_rss_mb"]
                            if g.get("steady_rss_mb") and t.get("steady_rss_mb") else None),
                peak_rss=g["peak_rss_mb"] / t["peak_rss_mb"],
                loss_step1_abs_diff=abs(losses[0][0] - losses[0][1]),
                loss_max_abs_diff=max(abs(x - y) for x, y in losses),
                same_batches=True)


def _f(x, fmt=".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def report(res: dict) -> str:
    s, m = res["settings"], res["machine"]
    runs = res["runs"]
    t0 = next(iter(runs.values()))["trl_raw"]
    flags = (f"--steps {s['steps']} --warmup {s['warmup']} --batch {s['batch']} --seq-len {s['seq_len']} "
             f"--threads {s['threads']} --variants {','.join(s['variants'])} --precision {','.join(s['precisions'])}")
    load = m.get("load", {})
    lines = [BEGIN, "## Reward-model step vs TRL RewardTrainer (bench/bench_rm.py)", "",
             f"`python bench/bench_rm.py {flags}` on {m['cpu']} ({m['id']}; {', '.join(m['flags'])}; torch CPU "
             f"capability {t0['torch_cpu_capability']}; quantized kernels {m['kernels']}), {res['date']}, "
             f"{s['threads']} threads per run, one subprocess per run, one after the other; torch {t0['torch']}, "
             f"transformers {t0['transformers']}, TRL {t0['trl']}, peft {t0['peft']}. Load at start: 1-min "
             f"average {load.get('loadavg_1m', float('nan')):.2f}, {load.get('procs_running', '?')} runnable, "
             f"{load.get('cores')} cores.", "",
             f"Gemma 3 270M (embedded GGUF, dequantized, fp32 master weights), {s['batch']} pairs per step "
             f"({2 * s['batch']} rows, padded to the batch's longest, at most {s['seq_len']} tokens), the same "
             f"{s['pairs']} pairs in the same order on both sides, AdamW lr {s['lr']:g} constant, grad clip 1.0; "
             f"{s['warmup']} warm-up steps dropped, median of {s['steps']} timed steps.", "",
             "| variant | precision | library | s/step | steps/s | pairs/s | tokens/s | loss step 1 -> last | "
             "steady peak RSS (MB) | process peak RSS (MB) | load 1-min (start / end) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in runs.items():
        for lib, name in (("gemmalab", "gemmalab"), ("trl", "TRL")):
            x, raw = r[lib], r[f"{lib}_raw"]
            lines.append(f"| {r['variant']} | {r['precision']} | {name} | {x['step_s']:.2f} | {x['steps_per_s']:.3f} | "
                         f"{x['pairs_per_s']:.2f} | {x['tok_s']:.1f} | {x['loss_first']:.4f} -> {x['loss_last']:.4f} | "
                         f"{_f(raw.get('steady_rss_mb'), '.0f')} | {raw['peak_rss_mb']:.0f} | "
                         f"{raw['load']['before'].get('loadavg_1m', float('nan')):.2f} / "
                         f"{raw['load']['after'].get('loadavg_1m', float('nan')):.2f} |")
    lines += ["", "| variant | precision | gemmalab / TRL steps/s (= pairs/s = tokens/s) | steady peak RSS | "
                  "process peak RSS | step-1 loss abs diff | max per-step loss abs diff |", "|---|---|---|---|---|---|---|"]
    for key, r in runs.items():
        lines.append(f"| {r['variant']} | {r['precision']} | **{r['steps_per_s']:.2f}x** | "
                     f"{_f(r['steady_rss'])}x | {r['peak_rss']:.2f}x | {r['loss_step1_abs_diff']:.1e} | "
                     f"{r['loss_max_abs_diff']:.1e} |")
    busy = max(max(r[f"{lib}_raw"]["load"]["after"].get("loadavg_1m", 0.0) for lib in ("gemmalab", "trl"))
               for r in runs.values())
    if busy > s["threads"] + 0.5:
        lines += ["", f"Caution: other jobs shared the machine (1-minute load average up to {busy:.1f} for "
                      f"{s['threads']} benchmark threads); re-run on an idle machine before quoting absolute figures."]
    g0 = next(iter(runs.values()))["gemmalab_raw"]
    lines += ["", "Settings and what each side used:", "",
              f"* Same weights and head: TRL trains `Gemma3TextForSequenceClassification` ({t0['attn']} attention) "
              f"holding our state dict (bench_sft.build_hf_model) and gemmalab's initial head (`rm.init_seed` 0, "
              f"Normal(0, 0.02)); initial scores of the first batch differ by at most "
              f"{max(r['trl_raw']['initial_score_max_abs_diff'] for r in runs.values()):.1e} (scores up to "
              f"{t0['initial_score_scale']:.1f}), after peft / freezing by at most "
              f"{max(r['trl_raw']['initial_score_max_abs_diff_wrapped'] for r in runs.values()):.1e}.",
              f"* Same rows: gemmalab's chat-template ids (user turn, generation prompt, completion, `<end_of_turn>`, "
              f"scored there) handed to TRL pre-tokenized, in gemmalab's order (`train_sampling_strategy="
              f"\"sequential\"`); every step's real tokens and padded shape checked equal on both sides. TRL's own "
              f"conversational path would give the same ids for {t0['native_same_ids']}/{t0['native_checked']} pairs "
              f"(rows longer by {t0['native_extra_tokens']} token(s), last tokens {t0['native_last_tokens']}, with "
              f"{t0['chat_template']}; the Gemma 3 template renders a `\\n` after the closing "
              f"`<end_of_turn>`, so TRL on raw conversational pairs scores that newline, not `<end_of_turn>`).",
              "* Variants: " + "; ".join(
                  f"{v}: gemmalab {next(r for r in runs.values() if r['variant'] == v)['gemmalab_raw']['trainable_params']:,}"
                  f" / TRL {next(r for r in runs.values() if r['variant'] == v)['trl_raw']['trainable_params']:,} "
                  f"trainable parameters" for v in s["variants"])
              + f". LoRA r = {s['lora_rank']}, alpha = {s['lora_rank']}, dropout 0 on {', '.join(LORA_TARGETS)} "
                f"(TRL: peft `task_type=\"SEQ_CLS\"`, `modules_to_save=[\"score\"]`, lora_A copied from gemmalab's "
                f"seeded A, B = 0 on both); top_blocks: the top {s['top_blocks']} blocks + final norm + head.",
              f"* Optimizer: gemmalab {g0['optimizer']}; TRL `{t0['optimizer']}`. TRL "
              f"`gradient_checkpointing={t0['gradient_checkpointing']}` (RewardConfig's default is True), "
              f"gemmalab `model.activation_checkpointing = false`.",
              "* Precision: " + "; ".join(
                  f"{p}: gemmalab `model.autocast = \"{AUTOCAST[p]}\"` ({_run(runs, p)['gemmalab_raw']['amp_note']}), "
                  f"{_run(runs, p)['gemmalab_raw']['reward_dtype']}; TRL `bf16={_run(runs, p)['trl_raw']['bf16_arg']}` "
                  f"(accelerate mixed precision `{_run(runs, p)['trl_raw']['mixed_precision']}`), "
                  f"{_run(runs, p)['trl_raw']['reward_dtype']}" for p in s["precisions"]) + ".",
              "* Steps: wall time between the ends of consecutive optimizer steps (data, forward, backward, clip, "
              "AdamW, the step's logging); tokens are the real (non-padding) tokens of the 2B rows. Steady peak RSS: "
              "VmHWM over the timed steps (reset after the warm-up); process peak: `ru_maxrss`, loading included "
              "(TRL's child also holds gemmalab's model while it checks the scores).",
              "* Loss: the Bradley-Terry loss -log sigmoid(r_c - r_r), mean over the step's pairs, at the weights "
              "before that step; both sides start from the same model, head and adapters on the same batches, so "
              "step 1 agrees to numerical noise and later steps drift only by the two libraries' rounding "
              "(and by bf16 where used).",
              END]
    return "\n".join(lines)


def _run(runs: dict, precision: str) -> dict:
    return next(r for r in runs.values() if r["precision"] == precision)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps dropped before timing")
    p.add_argument("--batch", type=int, default=4, help="preference pairs per step (2 rows each)")
    p.add_argument("--seq-len", type=int, default=256, help="at most this many tokens per row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--top-blocks", type=int, default=2)
    p.add_argument("--variants", default="lora,head", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--precision", default="auto",
                   help="fp32, bf16, or both (comma-separated); auto: fp32, and bf16 where the CPU has native bf16")
    p.add_argument("--pairs", type=int, default=0, help="pairs in the data set (default: batch x (warmup + steps))")
    p.add_argument("--workdir", default=None, help="pairs, configs, logs and results (default: a temp directory)")
    p.add_argument("--out", default=str(ROOT / "docs" / "reward_models.md"),
                   help="the docs page (its bench_rm section); bench_rm.json is written next to it")
    p.add_argument("--child-timeout", type=int, default=3600)
    p.add_argument("--report-only", action="store_true", help="rewrite --out from --workdir's results.json")
    p.add_argument("--child", choices=["gemmalab", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.child:
        res = child_gemmalab(a) if a.child == "gemmalab" else child_trl(a)
        Path(a.result).write_text(json.dumps(res))
        return 0

    out = Path(a.out)
    if a.report_only:
        if not a.workdir:
            raise SystemExit("--report-only needs --workdir (a previous run's work directory)")
        res = json.loads((Path(a.workdir) / "results.json").read_text())
        return _write(res, out)

    missing = [m for m in ("trl", "datasets", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        print(INSTALL_HINT + f"\n(missing: {', '.join(missing)})", file=sys.stderr)
        return 2
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise SystemExit(f"--variants: unknown {bad}; valid: {', '.join(VARIANTS)}")
    if a.warmup < 0 or a.steps < 1 or a.batch < 1 or a.seq_len < 16:
        raise SystemExit("need --steps >= 1, --warmup >= 0, --batch >= 1, --seq-len >= 16")

    sys.path.insert(0, str(ROOT))
    from gemmalab import cpu
    from gemmalab._paths import default_model_path
    from gemmalab.tokenizer import Tokenizer

    machine = cpu.describe()
    if a.precision == "auto":
        precisions = ["fp32", "bf16"] if cpu.native_bf16() else ["fp32"]
    elif a.precision == "both":
        precisions = list(PRECISIONS)
    else:
        precisions = [x.strip() for x in a.precision.split(",") if x.strip()]
        if not precisions or any(x not in PRECISIONS for x in precisions):
            raise SystemExit(f"--precision: fp32, bf16, both or auto, not {a.precision!r}")
    print(f"cpu: {bench_sft.describe_machine(machine)}", flush=True)

    a.workdir = a.workdir or tempfile.mkdtemp(prefix="bench_rm_")
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    total = a.warmup + a.steps
    n_pairs = a.pairs or a.batch * total
    tok = Tokenizer.from_gguf(default_model_path())
    pairs = make_pairs(n_pairs, a.seq_len, tok)
    (wd / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs))
    schedule = make_schedule(wd / "pairs.jsonl", tok, a.batch, a.seq_len, total)
    (wd / "schedule.json").write_text(json.dumps(schedule))
    from gemmalab.train.recipes.rm import encode_pairs, read_pairs
    encoded = [(c, r) for c, r, _, _ in encode_pairs(read_pairs([str(wd / "pairs.jsonl")]), tok, TEMPLATE, a.seq_len)]
    (wd / "encoded.json").write_text(json.dumps(encoded))
    shapes = schedule_shapes(schedule)
    lengths = [len(x) for c, r in encoded for x in (c, r)]
    print(f"data: {len(pairs)} pairs, rows of {min(lengths)}-{max(lengths)} tokens (mean "
          f"{statistics.mean(lengths):.0f}) -> {wd}/pairs.jsonl; {total} steps of {a.batch} pairs", flush=True)
    del tok

    settings = dict(steps=a.steps, warmup=a.warmup, batch=a.batch, seq_len=a.seq_len, threads=a.threads, lr=a.lr,
                    lora_rank=a.lora_rank, top_blocks=a.top_blocks, variants=variants, precisions=precisions,
                    pairs=len(pairs), template=TEMPLATE, row_tokens=dict(min=min(lengths), max=max(lengths),
                                                                          mean=statistics.mean(lengths)))
    runs = {}
    for precision in precisions:
        for variant in variants:
            g = run_child("gemmalab", a, variant, precision)
            t = run_child("trl", a, variant, precision)
            r = compare(g, t, shapes, a.batch, a.warmup)
            r.update(variant=variant, precision=precision, gemmalab_raw=g, trl_raw=t)
            runs[f"{variant}/{precision}"] = r
            print(f"  {variant} {precision}: gemmalab {r['gemmalab']['step_s']:.2f} s/step, TRL "
                  f"{r['trl']['step_s']:.2f} s/step -> {r['steps_per_s']:.2f}x steps/s; steady RSS "
                  f"{_f(g.get('steady_rss_mb'), '.0f')} / {_f(t.get('steady_rss_mb'), '.0f')} MB; loss "
                  f"{r['gemmalab']['loss_first']:.4f}->{r['gemmalab']['loss_last']:.4f} vs "
                  f"{r['trl']['loss_first']:.4f}->{r['trl']['loss_last']:.4f}", flush=True)
    res = dict(date=datetime.date.today().isoformat(), python=platform.python_version(), machine=machine,
               settings=settings, schedule_shapes=shapes, workdir=str(wd),
               command="python bench/bench_rm.py " + " ".join(sys.argv[1:] if argv is None else argv), runs=runs)
    (wd / "results.json").write_text(json.dumps(res, indent=1))
    return _write(res, out)


def _write(res: dict, out: Path) -> int:
    text = report(res)
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_section(out, BEGIN, END, text, "Reward models")
    (out.parent / "bench_rm.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nwrote {out} and {out.parent / 'bench_rm.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
