"""`gemmalab eval long-context`: does the model use its context? Probes a CPU can run.

- **position**: per-token NLL over one long document, reported in log-spaced position bins, next to
  a *window baseline*: the same tokens scored with only a short recent context (BOS + the previous
  W..2W-1 tokens, windows of 2W advanced by W). Local layers see W tokens anyway, so the gap
  between the two curves is what the global layers take from far context (Gemma 3's 5:1 design).
- **passkey**: retrieval of a number hidden at a depth of a junk text, over length x depth, in
  llama.cpp's examples/passkey format (string-equal for the same n_junk, i_pos and key, so
  llama.cpp can answer the identical prompts); greedy answer and the key's log-probability.
- **ruler**: the RULER-offline subset (gemmalab/eval/ruler.py), greedy answers scored with RULER's
  string_match_all.
- **rope-sweep**: positional interpolation (Chen et al. 2023) factors on the global layers only,
  as the Gemma 3 report did to reach 128K, plus the pitfall of scaling the local layers too,
  measured as NLL by position on one document.
"""
from __future__ import annotations

import math
import random
import re
import time

import torch

from .report import common_cli, finish, markdown_table, savefig
from .scoring import bulk_head, score_document, score_hidden

__all__ = ["position_nll", "window_nll", "position_bins", "passkey_prompt", "passkey_case",
           "passkey_grid", "run_ruler", "rope_sweep", "long_document", "add_cli"]

BINS = (1, 128, 512, 2048, 8192, 16384, 32768, 65536, 131072)

# ---- documents -----------------------------------------------------------------------------------


def long_document(tokenizer, n_tokens: int, source: str = "pydoc") -> list[int]:
    """BOS + the first n_tokens - 1 tokens of a packaged long text: CPython's pydoc topics (the
    language reference, ~190K tokens) or `stdlib` (concatenated standard-library modules)."""
    import os
    if source == "pydoc":
        from pydoc_data.topics import topics
        text = "\n\n".join(topics[k] for k in sorted(topics))
    elif source == "stdlib":
        root = os.path.dirname(os.__file__)
        names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
        parts, size = [], 0
        for n in names:  # ~4 bytes per token; stop once there is enough text
            parts.append(open(os.path.join(root, n), encoding="utf-8", errors="replace").read())
            size += len(parts[-1])
            if size > 6 * n_tokens:
                break
        text = "\n\n".join(parts)
    else:
        text = open(source, encoding="utf-8", errors="replace").read()
    ids = tokenizer.encode(text, add_bos=True)
    if len(ids) < n_tokens:
        raise ValueError(f"the document has {len(ids)} tokens; {n_tokens} were asked for")
    return ids[:n_tokens]


# ---- perplexity by position ----------------------------------------------------------------------

def position_nll(model, ids, *, chunk: int = 512, progress=None) -> torch.Tensor:
    """nll[p-1] = -log p(ids[p] | ids[:p]) for p = 1..T-1, each with its full context."""
    if len(ids) > model.config.max_position_embeddings:
        raise ValueError(f"{len(ids)} tokens exceed the model's context "
                         f"{model.config.max_position_embeddings}")
    return score_document(model, torch.as_tensor(ids), chunk=chunk, progress=progress)


@torch.inference_mode()
def window_nll(model, ids, window: int = 512, progress=None) -> torch.Tensor:
    """The window baseline at the same positions as `position_nll`: each token scored from BOS +
    the W..2W-1 tokens before it (tokens before 2W see their whole context, as in position_nll)."""
    ids = torch.as_tensor(ids).reshape(-1)
    T, W = ids.numel(), window
    bos = model.config.bos_token_id
    out = torch.empty(T - 1)
    first = min(T, 2 * W)
    out[:first - 1] = score_document(model, ids[:first])
    if progress is not None:
        progress.update(first)
    with bulk_head(model):
        for s in range(first, T, W):  # targets s..e-1, context from s-W (+BOS in front)
            e = min(s + W, T)
            x = torch.cat([torch.tensor([bos]), ids[s - W:e - 1]]).to(model.device)
            h = model.hidden_states(x[None])[0, W:]  # positions predicting ids[s:e]
            out[s - 1:e - 1] = score_hidden(model, h, ids[s:e]).nll
            if progress is not None:
                progress.update(e - s)
    return out


def position_bins(nll: torch.Tensor, bins=BINS) -> list[dict]:
    """Mean NLL per bin [lo, hi) of target position (position p predicts token p, p >= 1)."""
    pos = torch.arange(1, nll.numel() + 1)
    rows = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        sel = (pos >= lo) & (pos < hi)
        if not sel.any():
            break
        x = nll[sel].double()
        n = int(sel.sum())
        rows.append(dict(lo=lo, hi=hi, tokens=n, nll=float(x.mean()),
                         nll_stderr=float(x.std() / math.sqrt(n)) if n > 1 else 0.0,
                         ppl=math.exp(float(x.mean()))))
    return rows


# ---- passkey (llama.cpp examples/passkey/passkey.cpp) -----------------------------------------------

PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                  "memorize them. I will quiz you about the important information there.")
PASSKEY_SUFFIX = " What is the pass key? The pass key is"
PASSKEY_JUNK = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def passkey_prompt(n_junk: int, i_pos: int, key: int) -> str:
    """llama.cpp's passkey prompt for the same n_junk, i_pos and key (its key is rand() % 50000 + 1)."""
    if n_junk < 1 or not 0 <= i_pos < n_junk:
        raise ValueError(f"need n_junk >= 1 and 0 <= i_pos < n_junk, got {n_junk}, {i_pos}")
    parts = [PASSKEY_PREFIX]
    for i in range(n_junk):
        if i % n_junk == i_pos:
            parts.append(f" The pass key is {key}. Remember it. {key} is the pass key.")
        parts.append(PASSKEY_JUNK)
    return "".join(parts) + PASSKEY_SUFFIX


def passkey_case(tokenizer, length: int, depth: float, key: int) -> dict:
    """The largest n_junk whose prompt fits `length` tokens (BOS included), i_pos at `depth`."""
    def tokens(n):
        return len(tokenizer.encode(passkey_prompt(n, min(n - 1, int(n * depth)), key), add_bos=True))
    lo, hi = 1, max(2, length // 10)
    while tokens(hi) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if tokens(mid) <= length else (lo, mid)
    if tokens(lo) > length:
        raise ValueError(f"a passkey prompt needs more than {length} tokens")
    i_pos = min(lo - 1, int(lo * depth))
    prompt = passkey_prompt(lo, i_pos, key)
    return dict(length=length, depth=depth, key=key, n_junk=lo, i_pos=i_pos, prompt=prompt,
                ids=tokenizer.encode(prompt, add_bos=True))


@torch.inference_mode()
def greedy_with_logprob(model, ids: list[int], answer: list[int], max_new_tokens: int = 8):
    """(greedy continuation ids, sum log p(answer | ids)) with one prefill: the answer is scored
    teacher-forced, rolled back from the cache (`truncate`), then greedy decoding continues."""
    n = len(ids)
    cache = model.make_cache(1, n + max(len(answer), max_new_tokens) + 1)
    x = torch.tensor(ids, device=model.device)
    h_last = None
    for s in range(0, n, 512):
        h_last = model.hidden_states(x[None, s:s + 512], cache=cache)[0, -1:]
    logits0 = model.lm_head(h_last).float()[0]
    logp0 = logits0.log_softmax(-1)
    lp = float(logp0[answer[0]])
    if len(answer) > 1:
        h = model.hidden_states(torch.tensor([answer[:-1]], device=model.device), cache=cache)[0]
        lp += float(-score_hidden(model, h, torch.tensor(answer[1:])).nll.sum())
        cache.truncate(0, n)
    out = [int(logits0.argmax())]
    stop = {model.config.eos_token_id}
    while len(out) < max_new_tokens and out[-1] not in stop:
        h = model.hidden_states(torch.tensor([[out[-1]]], device=model.device), cache=cache)[0]
        out.append(int(model.lm_head(h).float()[0].argmax()))
    return out, lp


def _first_int(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def passkey_grid(lm, lengths, depths, *, seed: int = 0, max_new_tokens: int = 8,
                 progress: bool = False) -> list[dict]:
    from tqdm import tqdm
    cases = []
    rng = random.Random(seed)
    for L in lengths:
        if L > lm.config.max_position_embeddings:
            raise ValueError(f"passkey length {L} exceeds the model's context "
                             f"{lm.config.max_position_embeddings}")
        for d in depths:
            cases.append((L, d, rng.randint(1, 50000)))  # llama.cpp: rand() % 50000 + 1
    rows = []
    bar = tqdm(cases, desc="passkey", unit="prompt", disable=not progress, dynamic_ncols=True)
    for L, d, key in bar:
        case = passkey_case(lm.tokenizer, L, d, key)
        answer = lm.tokenizer.encode(f" {key}", add_bos=False)
        t0 = time.perf_counter()
        out, lp = greedy_with_logprob(lm.model, case["ids"], answer, max_new_tokens)
        text = lm.tokenizer.decode(out)
        rows.append(dict(length=L, depth=d, key=key, n_junk=case["n_junk"], i_pos=case["i_pos"],
                         prompt_tokens=len(case["ids"]), answer_text=text, answer=_first_int(text),
                         correct=_first_int(text) == key, key_logprob=lp,
                         seconds=time.perf_counter() - t0))
        bar.set_postfix(acc=f"{sum(r['correct'] for r in rows)}/{len(rows)}")
    return rows


# ---- RULER-offline --------------------------------------------------------------------------------

def run_ruler(lm, tasks, lengths, samples: int, *, seed: int = 0, max_new_tokens: int = 32,
              progress: bool = False) -> dict:
    """Greedy answers (at most max_new_tokens, cut at the first newline) scored per task/length."""
    from tqdm import tqdm

    from . import ruler
    jobs = [(t, L, i) for L in lengths for t in tasks for i in range(samples)]
    for t in tasks:
        if t not in ruler.TASKS:
            raise ValueError(f"unknown RULER-offline task {t!r}; choose from {', '.join(ruler.TASKS)}")
    for L in lengths:
        if L > lm.config.max_position_embeddings:
            raise ValueError(f"RULER length {L} exceeds the model's context "
                             f"{lm.config.max_position_embeddings}")
    preds: dict = {}
    details = []
    bar = tqdm(jobs, desc="ruler", unit="sample", disable=not progress, dynamic_ncols=True)
    for t, L, i in bar:
        s = ruler.generate(t, L, lm.tokenizer, seed=seed, index=i)
        n_new = min(max_new_tokens, s.tokens_to_generate)
        r = lm.generate(s.prompt, n_new, temperature=0)
        pred = r.text.lstrip("\n").split("\n")[0]  # RULER-offline: the first line of the answer
        preds.setdefault((t, L), []).append((pred, s.answers))
        details.append(dict(task=t, length=L, index=i, prompt_tokens=s.prompt_tokens,
                            answers=s.answers, prediction=pred))
    table = []
    for (t, L), pairs in preds.items():
        table.append(dict(task=t, length=L, samples=len(pairs),
                          score=ruler.score(t, [p for p, _ in pairs], [a for _, a in pairs])))
    by_len = {}
    for row in table:
        by_len.setdefault(row["length"], []).append(row["score"])
    return dict(scores=table, mean={L: sum(v) / len(v) for L, v in by_len.items()},
                samples=details, label="RULER-offline (not comparable with published RULER)")


# ---- RoPE interpolation sweep ---------------------------------------------------------------------

def rope_sweep(path, ids, factors, *, mode: str = "auto", pitfall: float | None = 2.0) -> list[dict]:
    """NLL by position of one document under global-layer PI factors (and one factor applied to
    every layer: the pitfall). Each row loads the model with the override."""
    import gemmalab
    runs = [(f, 1.0) for f in factors] + ([(pitfall, pitfall)] if pitfall else [])
    rows = []
    for g, loc in runs:
        lm = gemmalab.load(path, mode=mode, rope_scaling_factor=g, rope_local_scaling_factor=loc,
                           max_context=max(len(ids), 32768))
        t0 = time.perf_counter()
        nll = position_nll(lm.model, ids)
        rows.append(dict(global_factor=g, local_factor=loc, nll=float(nll.double().mean()),
                         first_512=float(nll[:511].double().mean()),
                         bins=position_bins(nll), seconds=time.perf_counter() - t0))
    return rows


# ---- plots ----------------------------------------------------------------------------------------

def plot_positions(full_bins, window_bins, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    mid = [math.sqrt(b["lo"] * min(b["hi"], b["lo"] + b["tokens"])) for b in full_bins]
    ax.errorbar(mid, [b["nll"] for b in full_bins], [b["nll_stderr"] for b in full_bins],
                marker="o", label="full context")
    if window_bins:
        ax.errorbar(mid[:len(window_bins)], [b["nll"] for b in window_bins],
                    [b["nll_stderr"] for b in window_bins], marker="s", label="window baseline")
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("mean NLL (nats)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    savefig(fig, path)
    plt.close(fig)


def plot_passkey(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = [[float("nan")] * len(lengths) for _ in depths]
    for r in rows:
        grid[depths.index(r["depth"])][lengths.index(r["length"])] = float(r["correct"])
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{L // 1024}K" if L >= 1024 else str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{int(100 * d)}%" for d in depths])
    for r in rows:
        ax.text(lengths.index(r["length"]), depths.index(r["depth"]),
                "ok" if r["correct"] else (str(r["answer"]) if r["answer"] is not None else "-"),
                ha="center", va="center", fontsize=8)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey depth")
    ax.set_title(title)
    savefig(fig, path)
    plt.close(fig)


# ---- CLI ------------------------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1024 if part.endswith("k") else 1
        try:
            v = int(float(part.rstrip("k")) * mult)
        except ValueError:
            raise ValueError(f"not a list of lengths: {text!r} (e.g. 1k,2k,4096)") from None
        if v < 1:
            raise ValueError(f"lengths must be positive: {text!r}")
        out.append(v)
    return out


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"not a list of numbers: {text!r}") from None


def add_cli(evals) -> None:
    p = evals.add_parser(
        "long-context", help="perplexity by position, passkey, RULER-offline, RoPE sweeps",
        description="Long-context probes: NLL by position with a window baseline, llama.cpp-format "
                    "passkey retrieval over length x depth, an offline RULER subset, and a RoPE "
                    "positional-interpolation sweep. Each writes JSON + Markdown (+ PNG) to --out.")
    p.add_argument("--probes", default="position,passkey,ruler",
                   help="comma list of position, passkey, ruler, rope-sweep (default: the first three)")
    p.add_argument("--doc", default="pydoc",
                   help="document for position / rope-sweep: pydoc (CPython's language reference), "
                        "stdlib, or a text file path")
    p.add_argument("--position-length", default="8k", help="tokens of the document (default 8k)")
    p.add_argument("--window", type=int, default=None,
                   help="window baseline context W (default: the model's sliding window); 0 = none")
    p.add_argument("--passkey-lengths", default="1k,2k,4k,8k")
    p.add_argument("--passkey-depths", default="0.1,0.5,0.9")
    p.add_argument("--ruler-tasks", default="niah_single_1,niah_single_2,niah_multikey_2,"
                                            "niah_multikey_3,vt,fwe")
    p.add_argument("--ruler-lengths", default="4k")
    p.add_argument("--ruler-samples", type=int, default=5)
    p.add_argument("--rope-factors", default="1,2,4", help="global-layer PI factors for rope-sweep")
    p.add_argument("--rope-length", default="8k", help="document tokens for rope-sweep")
    p.add_argument("--seed", type=int, default=0)
    common_cli(p, out_default="runs/eval/long_context")
    p.set_defaults(func=run)


def run(args) -> int:
    import gemmalab.cpu as cpu

    from .report import load_model
    probes = [x.strip() for x in args.probes.split(",") if x.strip()]
    bad = set(probes) - {"position", "passkey", "ruler", "rope-sweep"}
    if bad or not probes:
        raise ValueError(f"unknown probes {sorted(bad)}; use position, passkey, ruler, rope-sweep")
    lm = load_model(args)
    ctx = lm.config.max_position_embeddings
    progress = not args.no_progress
    result = dict(eval="long-context", model=str(lm.path) if lm.path else None, mode=lm.mode,
                  cpu=cpu.summary())
    md = ["# Long-context probes\n", f"model `{result['model']}`, mode {lm.mode}, {cpu.summary()}\n"]
    summary = []
    out = args.out
    from pathlib import Path
    if "position" in probes:
        n = _ints(args.position_length)[0]
        if n > ctx:
            raise ValueError(f"--position-length {n} exceeds the model's context {ctx}")
        ids = long_document(lm.tokenizer, n, args.doc)
        W = lm.config.sliding_window if args.window is None else args.window
        from tqdm import tqdm
        with tqdm(total=n * (2 if W else 1), desc="position", unit="tok", disable=not progress,
                  dynamic_ncols=True) as bar:
            t0 = time.perf_counter()
            full = position_nll(lm.model, ids, progress=bar)
            t_full = time.perf_counter() - t0
            win = window_nll(lm.model, ids, W, progress=bar) if W else None
        fb = position_bins(full)
        wb = position_bins(win) if win is not None else []
        result["position"] = dict(doc=args.doc, tokens=n, window=W, bins=fb, window_bins=wb,
                                  seconds_full=t_full, tokens_per_second=n / t_full)
        md.append(f"## NLL by position ({args.doc}, {n} tokens)\n")
        md.append(markdown_table(
            ["positions", "tokens", "NLL full", "PPL full", f"NLL window {W}", "window - full"],
            [[f"[{b['lo']}, {b['hi']})", b["tokens"], b["nll"], b["ppl"],
              wb[i]["nll"] if wb else None, (wb[i]["nll"] - b["nll"]) if wb else None]
             for i, b in enumerate(fb)]))
        if out:
            plot_positions(fb, wb, Path(out) / "position.png", f"NLL by position ({args.doc})")
            md.append("\n![NLL by position](position.png)\n")
        summary.append("position: " + ", ".join(f"[{b['lo']},{b['hi']}) {b['nll']:.3f}" for b in fb))
    if "passkey" in probes:
        rows = passkey_grid(lm, _ints(args.passkey_lengths), _floats(args.passkey_depths),
                            seed=args.seed, progress=progress)
        acc = sum(r["correct"] for r in rows) / len(rows)
        result["passkey"] = dict(rows=rows, accuracy=acc)
        md.append("## Passkey (llama.cpp format)\n")
        md.append(markdown_table(["length", "depth", "prompt tokens", "key", "answer", "correct",
                                  "log p(key)"],
                                 [[r["length"], r["depth"], r["prompt_tokens"], r["key"], r["answer"],
                                   r["correct"], r["key_logprob"]] for r in rows]))
        if out:
            plot_passkey(rows, Path(out) / "passkey.png", "passkey retrieval (greedy)")
            md.append("\n![passkey grid](passkey.png)\n")
        summary.append(f"passkey: {sum(r['correct'] for r in rows)}/{len(rows)} correct")
    if "ruler" in probes:
        if args.ruler_samples < 1:
            raise ValueError("--ruler-samples must be >= 1")
        tasks = [t.strip() for t in args.ruler_tasks.split(",") if t.strip()]
        r = run_ruler(lm, tasks, _ints(args.ruler_lengths), args.ruler_samples, seed=args.seed,
                      progress=progress)
        result["ruler"] = r
        md.append("## RULER-offline (not comparable with published RULER)\n")
        md.append(markdown_table(["task", "length", "samples", "score"],
                                 [[s["task"], s["length"], s["samples"], s["score"]]
                                  for s in r["scores"]]))
        summary.append("ruler: " + ", ".join(f"{L}: {v:.1f}" for L, v in r["mean"].items()))
    if "rope-sweep" in probes:
        n = _ints(args.rope_length)[0]
        ids = long_document(lm.tokenizer, n, args.doc)
        path = lm.path
        del lm
        rows = rope_sweep(path, ids, _floats(args.rope_factors), mode=args.mode)
        result["rope_sweep"] = dict(doc=args.doc, tokens=n, rows=rows)
        md.append(f"## RoPE interpolation sweep ({args.doc}, {n} tokens)\n")
        md.append(markdown_table(["global factor", "local factor", "NLL first 511", "NLL all"],
                                 [[r["global_factor"], r["local_factor"], r["first_512"], r["nll"]]
                                  for r in rows]))
        summary.append("rope-sweep: " + ", ".join(
            f"g{r['global_factor']:g}/l{r['local_factor']:g} {r['nll']:.3f}" for r in rows))
    return finish(args, result, "\n".join(md), "long_context", "\n".join(summary))
