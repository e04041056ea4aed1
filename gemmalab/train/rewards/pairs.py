"""Preference pairs synthesised from verifier scores, with controlled label noise, as JSONL.

No preference data ships with any package this project can install, so pairs for reward-model
training come from two samples of the policy for one prompt, labelled by a verifier: the better
scored one is "chosen". A chosen fraction of labels is then flipped on purpose, the corrupted-label
setting of WARM (Ramé et al. 2024, "WARM: On the Benefits of Weight Averaged Reward Models",
section 4: 25% of the training preferences flipped), and every record says whether it was.

File format (one JSON object per line, UTF-8, written atomically):

    {"prompt": str, "chosen": str, "rejected": str, "margin": float, "flipped": bool,
     "problem_id": str}

    prompt      the prompt both completions answer
    chosen      the completion labelled better (the worse one when flipped is true)
    rejected    the other completion
    margin      |score(chosen) - score(rejected)| by the verifier, >= 0 (0 for a tie broken by a
                secondary component); a property of the pair, unchanged by flipping
    flipped     true when the label was deliberately inverted (label noise)
    problem_id  Problem.id (optional when reading; other extra keys are kept as they are)

`read_pairs_jsonl` raises one PairFileError naming the file and line of the first malformed record.
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .base import Problem, RewardResult

__all__ = ["PairFileError", "preference_pairs", "write_pairs_jsonl", "read_pairs_jsonl"]

REQUIRED = {"prompt": str, "chosen": str, "rejected": str, "margin": (int, float), "flipped": bool}


class PairFileError(ValueError):
    """A preference-pair file or record is malformed (the message names the line)."""


def _score(s: Any, tie_break: str | None) -> tuple[float, float] | None:
    """(value, secondary) of one score, None when it is not a score (unscored status, None)."""
    if isinstance(s, RewardResult):
        if not s.scored:
            return None
        second = s.components.get(tie_break, 0.0) if tie_break else 0.0
        return float(s.value), float(second)
    if s is None:
        return None
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        raise ValueError(f"a score must be a finite number, a RewardResult or None, got {s!r}")
    return float(s), 0.0


def preference_pairs(problems: Sequence[Problem], completions_per_problem: Sequence[Sequence[str]],
                     scores: Sequence[Sequence[Any]], flip_fraction: float = 0.0, seed: int = 0, *,
                     tie_break: str | None = None, max_pairs_per_problem: int | None = None
                     ) -> list[dict]:
    """Pairs (chosen, rejected) among each problem's completions, ordered by their scores.

    scores[p][j] scores completions_per_problem[p][j]: a RewardResult (unscored statuses such as
    "timeout" are left out), a float, or None (left out). Every two completions of a problem with
    different values make a pair; ties are dropped, or, with tie_break naming a RewardResult
    component (e.g. "passed"), ordered by that component and dropped only if it ties too. Pairs
    whose two texts are identical are dropped. max_pairs_per_problem keeps a seeded sample.

    Then exactly round(flip_fraction * len(pairs)) pairs, drawn with `seed`, have chosen and
    rejected swapped and flipped=True. The same inputs and seed give the same list.
    """
    if not 0.0 <= flip_fraction <= 1.0:
        raise ValueError(f"flip_fraction must be in [0, 1], got {flip_fraction}")
    if not len(problems) == len(completions_per_problem) == len(scores):
        raise ValueError(f"{len(problems)} problems, {len(completions_per_problem)} completion "
                         f"lists and {len(scores)} score lists: they must match")
    if max_pairs_per_problem is not None and max_pairs_per_problem < 1:
        raise ValueError(f"max_pairs_per_problem must be >= 1, got {max_pairs_per_problem}")
    rng = random.Random(seed)
    pairs: list[dict] = []
    for problem, texts, row in zip(problems, completions_per_problem, scores):
        if len(texts) != len(row):
            raise ValueError(f"problem {problem.id!r}: {len(texts)} completions but {len(row)} scores")
        scored = [(t, s) for t, raw in zip(texts, row) if (s := _score(raw, tie_break)) is not None]
        found = []
        for a in range(len(scored)):
            for b in range(a + 1, len(scored)):
                (ta, sa), (tb, sb) = scored[a], scored[b]
                if sa == sb or ta == tb:
                    continue  # a tie (on the value and on the secondary component), or no contrast
                (win, ws), (lose, ls) = ((ta, sa), (tb, sb)) if sa > sb else ((tb, sb), (ta, sa))
                found.append({"prompt": problem.prompt, "chosen": win, "rejected": lose,
                              "margin": ws[0] - ls[0], "flipped": False, "problem_id": problem.id})
        if max_pairs_per_problem is not None and len(found) > max_pairs_per_problem:
            found = [found[i] for i in sorted(rng.sample(range(len(found)), max_pairs_per_problem))]
        pairs += found
    for i in rng.sample(range(len(pairs)), round(flip_fraction * len(pairs))):
        p = pairs[i]
        p["chosen"], p["rejected"], p["flipped"] = p["rejected"], p["chosen"], True
    return pairs


def _problem_with(record: Any) -> str:
    """Why `record` is not a valid pair ("" when it is)."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    for key, kind in REQUIRED.items():
        value = record[key]
        if not isinstance(value, kind) or (key == "margin" and isinstance(value, bool)):
            return f"{key!r} must be {'a number' if key == 'margin' else kind.__name__}, got {value!r}"[:200]
    if not math.isfinite(record["margin"]) or record["margin"] < 0:
        return f"'margin' must be a finite number >= 0, got {record['margin']!r}"
    if "problem_id" in record and not isinstance(record["problem_id"], str):
        return f"'problem_id' must be a string, got {record['problem_id']!r}"
    return ""


def write_pairs_jsonl(path: str | os.PathLike, pairs: Sequence[dict]) -> Path:
    """Write pairs as JSONL atomically (a temporary file in the same directory, fsync, os.replace),
    so a reader never sees half a file. Every record is checked first."""
    path = Path(path)
    for i, rec in enumerate(pairs):
        why = _problem_with(rec)
        if why:
            raise PairFileError(f"preference pair {i}: {why}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in pairs:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def read_pairs_jsonl(path: str | os.PathLike) -> list[dict]:
    """The pairs of a JSONL file (blank lines skipped); PairFileError names the first bad line."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PairFileError(f"{path}:{lineno}: not valid JSON ({e.msg} at column "
                                    f"{e.colno})") from None
            why = _problem_with(rec)
            if why:
                raise PairFileError(f"{path}:{lineno}: malformed preference pair: {why}")
            out.append(rec)
    return out
