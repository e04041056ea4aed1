"""On-policy distillation step throughput: `gemmalab train gkd` vs TRL's `GKDTrainer`, same model,
prompts, lengths and machine, in one invocation.

    pip install trl datasets          # only for this benchmark; gemmalab never imports TRL
    python bench/bench_gkd.py [--batch-size 2] [--max-new-tokens 32] [--warmup 1] [--steps 3]
                              [--threads 2] [--out docs/post_training.md]

Model: the embedded Gemma 3 270M, fp32, as student and as teacher (the same weights twice: the step's
cost is what is measured, not what it teaches). TRL trains transformers' `Gemma3ForCausalLM` built
from our weights (bench_sft.build_hf_model; logits checked equal within 1e-3 first). Both: full
fine-tuning, AdamW, lr 1e-5, lmbda = 1 (every step samples its completions from the student),
JSD(beta = 0.5), temperature 1, no top-k / top-p, max_new_tokens completion tokens, the same chat
prompts (stdlib docstring questions, bench_sft.make_records), the same batch size.

Completions stop at <end_of_turn> / <eos> in both, so their lengths differ from one draw to the
next; the report gives steps/s and tokens/s, where tokens are the rows' real tokens (prompt +
completion) the step trained on. gemmalab also runs with a LoRA student (r = 16, 7 projections)
sampled from the GGUF's own blocks + the fp32 LoRA path (`gkd.sampler = "native"`), the fast
rollout path; TRL has no such path (its LoRA runs through peft and samples with the same module).

Each library runs in its own subprocess, one after the other; the first `--warmup` steps are
discarded, the median of the next `--steps` is reported. `gemmalab.cpu.describe()` (CPU model,
flags, kernel variant, load) goes into the report.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- BEGIN bench_gkd -->", "<!-- END bench_gkd -->"


def _bench_sft():
    spec = importlib.util.spec_from_file_location("bench_sft", ROOT / "bench" / "bench_sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prompts_file(workdir: Path, n: int) -> Path:
    path = workdir / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _bench_sft().make_records(n)))
    return path


# ---------------------------------------------------------------------------------------------------
# Children

def child_gemmalab(a) -> dict:
    import resource

    import torch

    from gemmalab._paths import default_model_path
    from gemmalab.train.config import build_config
    from gemmalab.train.recipes.gkd import GKDConfig, check_gkd_config, train_gkd

    torch.set_num_threads(a.threads)
    total = a.warmup + a.steps
    out = Path(a.workdir) / f"gemmalab_{a.variant}"
    raw = {"model": {"autocast": "none"},
           "data": {"train": [str(Path(a.workdir) / "prompts.jsonl")], "batch_size": a.batch_size,
                    "seq_len": a.seq_len},
           "optim": {"lr": 1e-5, "weight_decay": 0.0, "grad_clip": 1.0},
           "run": {"out_dir": str(out), "steps": total, "log_every": 1, "save_every": total + 1,
                   "threads": a.threads, "device": "cpu", "seed": 0},
           "gkd": {"teacher": str(default_model_path()), "lmbda": 1.0, "divergence": "jsd", "beta": 0.5,
                   "temperature": 1.0, "max_new_tokens": a.max_new_tokens}}
    if a.variant == "full-batched":
        raw["gkd"]["exact_rows"] = False
    if a.variant == "lora-native":
        raw["lora"] = {"rank": 16}
        raw["gkd"]["sampler"] = "native"
    cfg = check_gkd_config(build_config(raw, GKDConfig))
    t0 = time.perf_counter()
    train_gkd(cfg, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps, prev = [], 0
    for r in rows:  # metrics: `tokens` counts target (completion) tokens; tokens_per_target is per target
        completion, prev = r["tokens"] - prev, r["tokens"]
        steps.append(dict(step=r["step"], wall_s=completion / r["tokens_per_s"], completion=completion,
                          tokens=r["tokens_per_target"] * completion, loss=r["loss"]))
    return dict(library="gemmalab", variant=a.variant, steps=steps, wall_s=time.perf_counter() - t0,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, torch=torch.__version__)


def child_trl(a) -> dict:
    import resource

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from trl.chat_template_utils import gemma3_chat_template
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    import gemmalab
    from gemmalab._paths import default_model_path

    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    bs = _bench_sft()
    lm = gemmalab.load(mode="fp32", dtype=torch.float32)
    student, _ = bs.build_hf_model(lm)
    teacher, _ = bs.build_hf_model(lm)
    prompt = lm.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        diff = float((lm.logits(prompt).float() - student.eval()(torch.tensor([prompt])).logits[0]).abs().max())
    if diff > 1e-3:
        raise RuntimeError(f"gemmalab and transformers logits differ by {diff:.2e}")
    del lm
    path = default_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.chat_template = gemma3_chat_template
    records = [json.loads(x) for x in (Path(a.workdir) / "prompts.jsonl").read_text().splitlines()]
    total = a.warmup + a.steps
    times: dict[str, dict[int, float]] = {"end": {}}
    sizes: list[tuple[int, int]] = []

    class StepTimer(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            times["end"][0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times["end"][state.global_step] = time.perf_counter()

    class Counting(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            sizes.append((int(inputs["attention_mask"].sum()), int((inputs["labels"] != -100).sum())))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = GKDConfig(output_dir=str(Path(a.workdir) / "trl_run"), per_device_train_batch_size=a.batch_size,
                     gradient_accumulation_steps=1, learning_rate=1e-5, weight_decay=0.0, max_grad_norm=1.0,
                     max_steps=total, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     bf16=False, fp16=False, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                     lmbda=1.0, beta=0.5, temperature=1.0, max_new_tokens=a.max_new_tokens,
                     max_length=a.seq_len)
    trainer = Counting(model=student.train(), teacher_model=teacher.eval(), args=args, processing_class=tok,
                       train_dataset=Dataset.from_list(records), callbacks=[StepTimer()])
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    steps = [dict(step=i, wall_s=times["end"][i] - times["end"][i - 1], tokens=sizes[i - 1][0],
                  completion=sizes[i - 1][1], loss=losses[i - 1] if i - 1 < len(losses) else None)
             for i in range(1, total + 1)]
    return dict(library="trl", steps=steps, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                trl=trl.__version__, transformers=transformers.__version__, logits_max_abs_diff=diff)


# ---------------------------------------------------------------------------------------------------
# Parent

def summarize(res: dict, warmup: int) -> dict:
    timed = res["steps"][warmup:]
    return dict(step_s=statistics.median(x["wall_s"] for x in timed),
                tok_s=statistics.median(x["tokens"] / x["wall_s"] for x in timed),
                tokens=statistics.mean(x["tokens"] for x in timed),
                completion=statistics.mean(x["completion"] for x in timed))


def run_child(kind: str, a, variant: str = "full") -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--variant", variant, "--workdir", a.workdir,
           "--batch-size", str(a.batch_size), "--max-new-tokens", str(a.max_new_tokens),
           "--seq-len", str(a.seq_len), "--warmup", str(a.warmup), "--steps", str(a.steps),
           "--threads", str(a.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TRL_EXPERIMENTAL_SILENCE="1",
               GEMMALAB_CPU_BF16="0")
    load = os.getloadavg()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} ({variant}) failed:\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["loadavg"] = [load[0], os.getloadavg()[0]]
    return res


def report(a, runs: list[tuple[str, dict, dict]], machine: dict) -> str:
    (_, gs, _), (_, ts, t) = runs[0], runs[-1]
    lines = [BEGIN, "## GKD step vs TRL GKDTrainer (bench/bench_gkd.py)", "",
             f"`python bench/bench_gkd.py --batch-size {a.batch_size} --max-new-tokens {a.max_new_tokens}` on "
             f"{machine['cpu']} ({', '.join(machine['flags'])}; kernels {machine['kernels']}), "
             f"{datetime.date.today().isoformat()}, {a.threads} threads per run, one run; TRL {t['trl']}, "
             f"transformers {t['transformers']}. Student and teacher: the 270M in fp32; lmbda = 1 (every step "
             "samples), JSD(0.5), temperature 1, full fine-tuning unless said.", "",
             "| run | s/step | tokens/s | tokens/step (prompt + completion) | completion tokens/step | "
             "peak RSS (MB) | load (1-min, start / end) |", "|---|---|---|---|---|---|---|"]
    for name, s, r in runs:
        lines.append(f"| {name} | {s['step_s']:.2f} | {s['tok_s']:.1f} | {s['tokens']:.0f} | "
                     f"{s['completion']:.0f} | {r['peak_rss_mb']:.0f} | {r['loadavg'][0]:.2f} / {r['loadavg'][1]:.2f} |")
    ratio = gs["tok_s"] / ts["tok_s"]
    lines += ["", f"**gemmalab / TRL, tokens/s (full fine-tuning, fp32 sampling both): {ratio:.2f}x**; "
                  f"steps/s: {ts['step_s'] / gs['step_s']:.2f}x. Goal: >= 2x — {'met' if ratio >= 2 else 'not met'}."]
    by_name = {n: x for n, x, _ in runs}
    for name, x in by_name.items():
        if name != runs[0][0] and not name.startswith("TRL"):
            lines += ["", f"{name}: {x['tok_s'] / ts['tok_s']:.2f}x TRL's tokens/s."]
    lines += ["", "Completion lengths differ between the libraries (each samples its own completions and "
                  "stops at <end_of_turn>), which is why tokens/s is the figure compared.", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=160)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(ROOT / "docs" / "post_training.md"))
    p.add_argument("--no-lora", action="store_true", help="skip the LoRA + native sampler run")
    p.add_argument("--child", choices=["gemmalab", "trl"], default=None)
    p.add_argument("--variant", default="full")
    a = p.parse_args(argv)
    if a.child:
        res = child_gemmalab(a) if a.child == "gemmalab" else child_trl(a)
        print(json.dumps(res))
        return 0
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("bench_gkd.py compares against TRL: pip install -c constraints.txt trl datasets")
    import tempfile

    sys.path.insert(0, str(ROOT))
    from gemmalab import cpu

    a.workdir = a.workdir or tempfile.mkdtemp(prefix="bench_gkd_")
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    prompts_file(Path(a.workdir), 64)
    machine = cpu.describe()
    runs = []
    g = run_child("gemmalab", a)
    runs.append(("gemmalab (full fine-tuning, fp32 sampler, exact rows: the default)", summarize(g, a.warmup), g))
    gb = run_child("gemmalab", a, "full-batched")
    runs.append(("gemmalab (full fine-tuning, fp32 sampler, gkd.exact_rows = false)", summarize(gb, a.warmup), gb))
    if not a.no_lora:
        gl = run_child("gemmalab", a, "lora-native")
        runs.append(("gemmalab (LoRA r=16, native + LoRA sampler)", summarize(gl, a.warmup), gl))
    t = run_child("trl", a)
    runs.append(("TRL GKDTrainer (full fine-tuning)", summarize(t, a.warmup), t))
    text = report(a, runs, machine)
    print(text)
    json.dump({"machine": machine, "runs": [[n, s, r] for n, s, r in runs]},
              open(Path(a.workdir) / "results.json", "w"), indent=1)
    sys.path.insert(0, str(ROOT / "bench"))
    from docs_section import replace_section
    replace_section(Path(a.out), BEGIN, END, text, "Post-training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
