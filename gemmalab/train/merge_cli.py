"""`gemmalab merge average` and `gemmalab reward score`: weight averaging (WARM) and scoring with
reward models. argparse only at import; torch and the models load when a command runs.

    gemmalab merge average RUN_OR_CKPT... -o OUT [--weights W ...]
        reward models (`gemmalab train rm` runs, their final/ or checkpoints): one RM whose LoRA
        adapter is the weighted average of the members' updates (concatenated rank, exact) and whose
        head / top blocks are averaged (Rame et al. 2024, WARM); other training runs or checkpoints:
        the average of their trainable tensors (LoRA runs: merged on their updates too), written as
        OUT/model.safetensors with OUT/merge.json
    gemmalab reward score RM FILE.jsonl
        {prompt, chosen, rejected} lines: accuracy, loss, ECE (and the agreement with flipped labels);
        {prompt, completion} lines: each line again with its "score"
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

__all__ = ["add_cli", "average_checkpoints", "cmd_merge_average", "cmd_reward_score"]


def add_cli(subparsers) -> None:
    """Register `gemmalab merge average` and `gemmalab reward score`."""
    mg = subparsers.add_parser("merge", help="weight-average models (WARM reward models, checkpoints)")
    merges = mg.add_subparsers(dest="merge_command", required=True, metavar="MERGE")
    av = merges.add_parser(
        "average", help="the (weighted) average of reward models or training checkpoints",
        description="Reward models (gemmalab train rm) are merged into one reward model: LoRA adapters "
                    "on their updates B A (one adapter of concatenated rank, exact; averaging A and B "
                    "separately would add cross terms), heads and top blocks tensor by tensor. Members "
                    "must share their base, trainable setting and shapes (WARM: fine-tuned from one "
                    "shared init). Other runs or checkpoints: their trainable tensors are averaged.")
    av.add_argument("members", nargs="+", metavar="RUN_OR_CKPT",
                    help="`train rm` run directories, their final/, checkpoints/step-N, or .safetensors")
    av.add_argument("-o", "--out", required=True, help="output directory")
    av.add_argument("--weights", type=float, nargs="+", default=None, metavar="W",
                    help="one weight per member (normalised to sum to 1; default uniform)")
    av.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    av.set_defaults(func=cmd_merge_average)

    rw = subparsers.add_parser("reward", help="use reward models (score pairs or completions)")
    cmds = rw.add_subparsers(dest="reward_command", required=True, metavar="REWARD")
    sc = cmds.add_parser("score", help="accuracy on preference pairs, or scores of completions",
                         description="FILE holds JSONL {prompt, chosen, rejected} pairs (prints accuracy, "
                                     "loss, calibration) or {prompt, completion} lines (prints each line "
                                     "with its score).")
    sc.add_argument("rm", metavar="RM", help="a reward model: `train rm` run, final/, checkpoint, merge")
    sc.add_argument("file", metavar="PAIRS_OR_JSONL")
    sc.add_argument("--batch-size", type=int, default=16, help="rows per forward (default 16)")
    sc.add_argument("--device", default="cpu")
    sc.add_argument("--json", action="store_true", help="pairs: print the metrics as one JSON object")
    sc.set_defaults(func=cmd_reward_score)


# ---------------------------------------------------------------------------------------------------
# merge average

def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    return out


def cmd_merge_average(args) -> int:
    from .rewards.model import average_reward_models, resolve_reward_model, write_reward_model

    out = _prepare_out(Path(args.out), args.overwrite)
    kinds = []
    for m in args.members:
        try:
            resolve_reward_model(m)
            kinds.append("rm")
        except ValueError:
            kinds.append("dense")
    if len(set(kinds)) > 1:
        rms = [m for m, k in zip(args.members, kinds) if k == "rm"]
        other = [m for m, k in zip(args.members, kinds) if k != "rm"]
        raise ValueError(f"cannot average reward models ({rms[0]}) with other checkpoints ({other[0]})")
    if kinds[0] == "rm":
        meta, tensors = average_reward_models(args.members, args.weights)
        write_reward_model(out, meta, tensors)
        what = (f"LoRA rank {meta['lora']['rank']} (concatenated)" if meta["trainable"] == "lora"
                else meta["trainable"].replace("_", " "))
        print(f"wrote {out}: the average of {len(args.members)} reward models ({what} + head); score it "
              f"with: gemmalab reward score {out} PAIRS.jsonl")
        return 0
    info = average_checkpoints(args.members, out, args.weights)
    print(f"wrote {out / 'model.safetensors'}: the average of {len(args.members)} checkpoints "
          f"({info['tensors']} tensors{', LoRA merged on its updates' if info.get('lora') else ''})")
    return 0


def _dense_member(path: str) -> tuple[Path, dict | None]:
    """(tensors file, the run's config.json as a dict, if found) of a run, checkpoint or file."""
    from . import checkpoint as ckpt

    p = Path(path)
    if p.is_file() and p.name.endswith(".safetensors"):
        tensors, run = p, (p.parent.parent.parent if p.parent.parent.name == "checkpoints" else None)
    elif (p / "model.safetensors").is_file():
        tensors, run = p / "model.safetensors", (p.parent.parent if p.parent.name == "checkpoints" else None)
    elif p.is_dir() and ckpt.latest(p) is not None:
        tensors, run = ckpt.latest(p) / "model.safetensors", p
    elif not p.exists():
        raise ValueError(f"{p}: no such run, checkpoint or .safetensors file")
    else:
        raise ValueError(f"{p} is neither a reward model nor a training run or checkpoint "
                         "(no model.safetensors, no checkpoints/latest)")
    config = None
    if run is not None and (run / "config.json").is_file():
        config = json.loads((run / "config.json").read_text())
    return tensors, config


def _base_hash(config: dict | None) -> str | None:
    """The identity of a run's frozen base from its config.json: the [model] section, and the seed
    that drew a preset's random weights."""
    if config is None or "model" not in config:
        return None
    model = dict(config["model"])
    record = {"model": {k: model.get(k) for k in ("path", "preset", "arch", "tokenizer")}}
    if model.get("preset"):
        record["seed"] = (config.get("run") or {}).get("seed")
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def average_checkpoints(paths, out: str | Path, weights=None) -> dict:
    """Average the trainable tensors of training runs / checkpoints (train.averaging.average) into
    OUT/model.safetensors, with OUT/merge.json (members, weights). Runs trained with LoRA
    (config.json's lora.rank > 0) are merged on their updates (merge_lora_deltas). The base of each
    member (its config.json's [model] section) must be the same."""
    from safetensors.torch import load_file, save_file

    from .averaging import MergeError, _weights, average, check_mergeable, merge_lora_deltas

    members = [_dense_member(p) for p in paths]
    names = [str(p) for p in paths]
    c = _weights(len(members), weights)
    tensors = [load_file(str(t)) for t, _ in members]
    hashes = [_base_hash(cfg) for _, cfg in members]
    bases = hashes if all(h is not None for h in hashes) else None
    check_mergeable(tensors, bases, names)
    loras = [(cfg or {}).get("lora", {}) for _, cfg in members]
    has_lora = any(".lora_" in k for k in tensors[0])
    info: dict = {"members": [{"path": n, "weight": ci, "base_hash": h} for n, ci, h in zip(names, c, hashes)],
                  "merge": "average"}
    if has_lora:
        if any(not lo.get("rank") for lo in loras):
            raise MergeError(f"{names[0]} holds LoRA factors, but not every member has a config.json with "
                             "its lora.rank and lora.alpha: LoRA members are merged on scale * B A, and "
                             "averaging A and B separately is not their average")
        lora_sds = [{k: v for k, v in t.items() if ".lora_" in k} for t in tensors]
        rest = [{k: v for k, v in t.items() if ".lora_" not in k} for t in tensors]
        merged, scale = merge_lora_deltas(lora_sds, c, scales=[lo["alpha"] / lo["rank"] for lo in loras],
                                          bases=bases, names=names)
        result = {**merged, **(average(rest, c, bases=bases, names=names) if rest[0] else {})}
        rank = next(v for k, v in merged.items() if k.endswith(".lora_a")).shape[0]
        info["lora"] = {"rank": rank, "scale": scale, "alpha": scale * rank}
    else:
        result = average(tensors, c, bases=bases, names=names)
    info["tensors"] = len(result)
    from .checkpoint import write_dir_atomic

    tensors_out = {k: v.contiguous() for k, v in result.items()}
    write_dir_atomic(Path(out), {"model.safetensors": lambda path: save_file(tensors_out, str(path)),
                                 "merge.json": json.dumps(info, indent=2).encode()})
    return info


# ---------------------------------------------------------------------------------------------------
# reward score

def cmd_reward_score(args) -> int:
    import torch

    from .losses import preference_metrics
    from .recipes.rm import encode_pairs, read_pairs, read_records
    from .rewards.model import encode, load_reward_model, score_sequences

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    records = read_records([args.file])
    if not records:
        raise ValueError(f"{args.file} holds no JSON lines")
    is_pair = ["chosen" in r and "rejected" in r for _, r in records]
    if any(is_pair) and not all(is_pair):
        where = records[is_pair.index(False)][0]
        raise ValueError(f"{where}: mixes preference pairs and completions; one file holds one kind")
    model, tokenizer, meta = load_reward_model(args.rm, args.device)
    template, seq_len = meta["template"], int(meta["seq_len"])
    if all(is_pair):
        encoded = encode_pairs(read_pairs([args.file]), tokenizer, template, seq_len)
        seqs = [s for c, r, _, _ in encoded for s in (c, r)]
        s = score_sequences(model, seqs, tokenizer.pad_id, args.batch_size).view(-1, 2)
        m = preference_metrics(s[:, 0], s[:, 1], torch.tensor([f for *_, f in encoded]))
        if args.json:
            print(json.dumps(m))
            return 0
        print(f"{m['pairs']} pairs: accuracy {m['accuracy']:.4f}, loss {m['loss']:.4f}, ece {m['ece']:.4f}, "
              f"margin {m['margin']:.4f}")
        if "accuracy_flipped" in m:
            print(f"flipped labels: agreement {m['accuracy_flipped']:.4f} (memorised)"
                  + (f"; clean pairs: accuracy {m['accuracy_clean']:.4f}" if "accuracy_clean" in m else ""))
        return 0
    seqs = []
    for where, r in records:
        if not isinstance(r.get("prompt"), str) or not isinstance(r.get("completion"), str):
            raise ValueError(f"{where}: a line needs string 'prompt' and 'completion' (or 'chosen' and "
                             "'rejected' for a pair)")
        try:
            seqs.append(encode(tokenizer, r["prompt"], r["completion"], template, seq_len))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    scores = score_sequences(model, seqs, tokenizer.pad_id, args.batch_size)
    for (_, r), s in zip(records, scores.tolist()):
        sys.stdout.write(json.dumps({**r, "score": s}) + "\n")
    return 0
