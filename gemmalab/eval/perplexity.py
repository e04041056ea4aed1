"""`gemmalab eval perplexity`: llama.cpp's `llama-perplexity` protocol on any text file.

The protocol (llama.cpp tools/perplexity/perplexity.cpp, `perplexity()`), so that a number from
here can be put next to one from llama.cpp:
- the whole file is tokenized once, with BOS; it needs at least 2 x ctx tokens;
- it is cut into floor(N / ctx) chunks of ctx tokens (`--chunks` keeps the first few); the first
  token of every chunk is *overwritten* by BOS (not inserted), and each chunk is evaluated alone;
- only the second half is scored: positions first = ctx/2 .. ctx-2 predict tokens first+1 ..
  ctx-1, i.e. ctx/2 - 1 tokens per chunk (255 at ctx 512);
- PPL = exp(mean NLL), and the "+/-" is PPL x sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1)).
With a reference model (`--kl-reference`, llama-perplexity's --kl-divergence) the same positions
also give KL(p_ref || p_model), its percentiles, and how often both models' top token agree.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .report import common_cli, finish, load_model, markdown_table
from .scoring import TokenScores, bulk_head, score_hidden

__all__ = ["perplexity", "chunk_ids", "ppl_with_error", "read_text", "add_cli"]


def read_text(path: str | Path) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"{path} is empty; perplexity needs text")
    return text


def chunk_ids(ids: list[int], ctx: int, chunks: int | None, bos: int) -> list[list[int]]:
    """llama-perplexity's chunks: floor(N / ctx) windows, each with its first token set to BOS."""
    if ctx < 4 or ctx % 2:
        raise ValueError(f"--ctx must be an even number >= 4, got {ctx}")
    if len(ids) < 2 * ctx:
        raise ValueError(f"the text tokenizes to {len(ids)} tokens; perplexity with a context of "
                         f"{ctx} needs at least {2 * ctx} (like llama-perplexity)")
    n = len(ids) // ctx
    if chunks is not None:
        if chunks < 1:
            raise ValueError("--chunks must be >= 1")
        n = min(n, chunks)
    out = []
    for c in range(n):
        chunk = list(ids[c * ctx:(c + 1) * ctx])
        chunk[0] = bos
        out.append(chunk)
    return out


def ppl_with_error(nll: torch.Tensor) -> tuple[float, float]:
    """(PPL, +/-) with llama-perplexity's formula (accumulated in double precision)."""
    x = nll.double()
    count = x.numel()
    mean, mean2 = float(x.mean()), float((x * x).mean())
    ppl = math.exp(mean)
    var = mean2 - mean * mean
    err = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
    return ppl, err


def _percentiles(x: torch.Tensor) -> dict:
    # llama-perplexity reports these percentiles of the per-token KLD
    qs = {"max": 1.0, "p99.9": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90, "median": 0.5,
          "p10": 0.10, "p5": 0.05, "p1": 0.01, "min": 0.0}
    s = x.double().sort().values
    n = s.numel()
    return {k: float(s[min(n - 1, max(0, round(q * (n - 1))))]) for k, q in qs.items()}


def _mean_err(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    n = x.numel()
    m = float(x.mean())
    return m, (float(x.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0)


def perplexity(lm, text: str | list[int], *, ctx: int = 512, chunks: int | None = None,
               reference=None, progress: bool = False, batch: int = 1) -> dict:
    """llama-perplexity on `text` (a string, tokenized with BOS, or token ids that already start
    with BOS) with an `LM`; `reference` (another LM with the same vocabulary) adds KL statistics.

    batch: chunks evaluated per forward pass (they are independent sequences of equal length).
    """
    from tqdm import tqdm

    model = lm.model
    if ctx > model.config.max_position_embeddings:
        raise ValueError(f"--ctx {ctx} is longer than the model's context "
                         f"{model.config.max_position_embeddings}")
    ids = lm.tokenizer.encode(text, add_bos=True) if isinstance(text, str) else [int(i) for i in text]
    bos = model.config.bos_token_id
    pieces = chunk_ids(ids, ctx, chunks, bos)
    first = ctx // 2
    if reference is not None and reference.model.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the reference has {reference.model.config.vocab_size} vocabulary entries, "
                         f"the model {model.config.vocab_size}; KL needs the same vocabulary")
    scores, nll_sum, count = [], 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(pieces), unit="chunk", desc="perplexity", disable=not progress,
               dynamic_ncols=True)
    with torch.inference_mode(), bulk_head(model, reference.model if reference else None):
        for s in range(0, len(pieces), batch):
            x = torch.tensor(pieces[s:s + batch], device=model.device)
            targets = x[:, first + 1:]
            h = model.hidden_states(x)[:, first:ctx - 1]
            kw = {}
            if reference is not None:
                kw = dict(ref_model=reference.model,
                          ref_hidden=reference.model.hidden_states(x.to(reference.model.device))
                          [:, first:ctx - 1].to(h.device))
            part = score_hidden(model, h, targets, **kw)
            scores.append(part)
            nll_sum += float(part.nll.double().sum())
            count += part.nll.numel()
            bar.update(x.shape[0])
            bar.set_postfix(ppl=f"{math.exp(nll_sum / count):.3f}")
    bar.close()
    seconds = time.perf_counter() - t0
    sc = TokenScores.cat(scores)
    ppl, err = ppl_with_error(sc.nll)
    per_chunk = sc.nll.view(len(pieces), -1).double()
    # the running estimate llama-perplexity prints after each chunk: [1]x,[2]y,...
    cum = per_chunk.mean(1).cumsum(0) / torch.arange(1, len(pieces) + 1, dtype=torch.float64)
    result = dict(
        eval="perplexity", ppl=ppl, ppl_stderr=err, nll=float(sc.nll.double().mean()),
        tokens_scored=int(sc.nll.numel()), chunks=len(pieces), ctx=ctx, text_tokens=len(ids),
        seconds=seconds, tokens_per_second=sc.nll.numel() / seconds if seconds > 0 else None,
        running_ppl=[math.exp(float(v)) for v in cum],
        model=str(lm.path) if lm.path else None, mode=lm.mode,
    )
    if reference is not None:
        kl_mean, kl_err = _mean_err(sc.kl)
        same, same_err = _mean_err(sc.same_top.double())
        ref_ppl, ref_err = ppl_with_error(sc.ref_nll)
        ln_ratio, ln_ratio_err = _mean_err(sc.nll.double() - sc.ref_nll.double())
        result["kl"] = dict(
            reference=str(reference.path) if reference.path else None, reference_mode=reference.mode,
            reference_ppl=ref_ppl, reference_ppl_stderr=ref_err, mean_kld=kl_mean,
            mean_kld_stderr=kl_err, kld=_percentiles(sc.kl), same_top_p=100 * same,
            same_top_p_stderr=100 * same_err, mean_ln_ppl_ratio=ln_ratio,
            mean_ln_ppl_ratio_stderr=ln_ratio_err)
    return result


def markdown(r: dict) -> str:
    rows = [["PPL", f"{r['ppl']:.4f} +/- {r['ppl_stderr']:.5f}"], ["tokens scored", r["tokens_scored"]],
            ["chunks x ctx", f"{r['chunks']} x {r['ctx']}"], ["model", r["model"] or "embedded 270M"],
            ["mode", r["mode"]], ["tokens/s", f"{r['tokens_per_second']:.1f}"]]
    if "kl" in r:
        k = r["kl"]
        rows += [["reference PPL", f"{k['reference_ppl']:.4f} +/- {k['reference_ppl_stderr']:.5f}"],
                 ["mean KLD", f"{k['mean_kld']:.6f} +/- {k['mean_kld_stderr']:.6f}"],
                 ["median / p99 / max KLD", f"{k['kld']['median']:.6f} / {k['kld']['p99']:.6f} / "
                                            f"{k['kld']['max']:.6f}"],
                 ["same top p", f"{k['same_top_p']:.3f} +/- {k['same_top_p_stderr']:.3f} %"]]
    return "# Perplexity (llama-perplexity protocol)\n\n" + markdown_table(["", "value"], rows)


def add_cli(evals) -> None:
    p = evals.add_parser(
        "perplexity", help="perplexity of a text file (llama-perplexity's protocol)",
        description="Perplexity with llama.cpp's llama-perplexity protocol: chunks of --ctx tokens, "
                    "BOS overwriting each chunk's first token, the second half of each chunk scored. "
                    "Prints 'PPL = x +/- y' like llama.cpp; --kl-reference adds KL statistics.")
    p.add_argument("file", help="UTF-8 text file")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="score only the first N chunks")
    p.add_argument("--batch", type=int, default=1, help="chunks per forward pass (default 1)")
    p.add_argument("--kl-reference", default=None, metavar="MODEL",
                   help="also report KL(reference || model) per token, like llama-perplexity "
                        "--kl-divergence (e.g. the fp32 or F32-export reference of a quantized model)")
    p.add_argument("--reference-mode", default="fp32", choices=["auto", "fp32", "native", "q8"],
                   help="compute mode of the reference (default fp32)")
    common_cli(p, out_default="runs/eval/perplexity")
    p.set_defaults(func=run)


def run(args) -> int:
    text = read_text(args.file)
    if args.batch < 1:
        raise ValueError("--batch must be >= 1")
    lm = load_model(args)
    ref = None
    if args.kl_reference is not None:
        import gemmalab
        if not Path(args.kl_reference).expanduser().exists():
            raise FileNotFoundError(f"reference model not found: {args.kl_reference}")
        ref = gemmalab.load(args.kl_reference, mode=args.reference_mode)
    r = perplexity(lm, text, ctx=args.ctx, chunks=args.chunks, reference=ref,
                   progress=not args.no_progress, batch=args.batch)
    r["file"] = str(args.file)
    summary = (f"Final estimate: PPL = {r['ppl']:.4f} +/- {r['ppl_stderr']:.5f}  "
               f"({r['tokens_scored']} tokens in {r['chunks']} chunks of {r['ctx']}, "
               f"{r['tokens_per_second']:.1f} tokens/s)")
    if ref is not None:
        k = r["kl"]
        summary += (f"\nMean KLD: {k['mean_kld']:.6f} +/- {k['mean_kld_stderr']:.6f}   "
                    f"Same top p: {k['same_top_p']:.3f} +/- {k['same_top_p_stderr']:.3f} %")
    return finish(args, r, markdown(r), "perplexity", summary)
