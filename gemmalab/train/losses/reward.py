"""The Bradley-Terry preference loss of reward models, and the metrics of a reward model on pairs.

    bt_loss(r_c, r_r)          -log sigmoid(r_c - r_r [- margin]) [+ center_coef (r_c + r_r)^2]
    preference_metrics(r_c, r_r)  accuracy, held-out loss, expected calibration error (ECE)

Bradley & Terry (1952) model the probability that y_c is preferred to y_r as
sigmoid(r(x, y_c) - r(x, y_r)); a reward model maximises its log-likelihood on labelled pairs
(Ouyang et al. 2022; Rame et al. 2024, WARM, eq. 1). Two options follow TRL's RewardTrainer:
`margin` (Llama 2's per-pair margin, subtracted from the difference) and `center_coef`
(TRL's `center_rewards_coefficient`, Eisenstein et al. 2023): the loss only sees differences, so a
penalty on (r_c + r_r)^2 pins the free offset of the scores near 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bt_loss", "preference_metrics", "expected_calibration_error"]


def bt_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None,
            center_coef: float = 0.0, reduction: str = "sum") -> torch.Tensor:
    """-log sigmoid(r_c - r_r - margin) per pair (+ center_coef * (r_c + r_r)^2), in fp32 or wider.

    logsigmoid keeps it finite for any difference (-log sigmoid(-100) = 100, not inf). reduction:
    "sum" (what the trainer divides by its normalizer), "mean" or "none" (per pair).
    """
    if chosen_scores.shape != rejected_scores.shape:
        raise ValueError(f"chosen scores {tuple(chosen_scores.shape)} and rejected scores "
                         f"{tuple(rejected_scores.shape)} differ in shape")
    dtype = torch.promote_types(chosen_scores.dtype, torch.float32)  # bf16 scores: the loss in fp32
    r_c, r_r = chosen_scores.to(dtype), rejected_scores.to(dtype)
    diff = r_c - r_r
    if margin is not None:
        diff = diff - margin.to(diff)
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (r_c + r_r).square()
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'sum', 'mean' or 'none', not {reduction!r}")


def expected_calibration_error(p_chosen: torch.Tensor, n_bins: int = 10) -> float:
    """The ECE (Guo et al. 2017) of the predicted preference p = sigmoid(r_c - r_r) on labelled pairs.

    The prediction is "chosen wins" when p > 0.5 with confidence max(p, 1 - p), correct when p > 0.5
    (a tie, p = 0.5, counts half); the confidences fall into `n_bins` equal bins of [0, 1] (with 10,
    only the upper five can fill), and ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|.
    This equals the ECE of the symmetrised reliability diagram, where each pair counts as (p, 1) and
    (1 - p, 0).
    """
    p = p_chosen.double().flatten()
    if p.numel() == 0:
        return float("nan")
    conf = torch.maximum(p, 1 - p)
    correct = (p > 0.5).double() + 0.5 * (p == 0.5).double()
    bins = torch.clamp((conf * n_bins).long(), max=n_bins - 1)
    ece = 0.0
    for b in bins.unique().tolist():
        sel = bins == b
        ece += float(sel.double().mean() * (correct[sel].mean() - conf[sel].mean()).abs())
    return ece


@torch.no_grad()
def preference_metrics(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       flipped: torch.Tensor | None = None, n_bins: int = 10) -> dict[str, float]:
    """accuracy (r_c > r_r; ties count half), loss (mean BT loss, no margin or centering), ece, and
    the mean reward margin r_c - r_r. With `flipped` (bool per pair: its label was corrupted on
    purpose, WARM section 5), also accuracy_clean and accuracy_flipped: the agreement with the
    corrupted labels is what a reward model memorised."""
    diff = chosen_scores.double() - rejected_scores.double()
    correct = (diff > 0).double() + 0.5 * (diff == 0).double()
    out = {"accuracy": float(correct.mean()), "loss": float(bt_loss(chosen_scores.double(),
                                                                    rejected_scores.double(),
                                                                    reduction="mean")),
           "ece": expected_calibration_error(torch.sigmoid(diff), n_bins), "margin": float(diff.mean()),
           "pairs": int(diff.numel())}
    if flipped is not None and flipped.any():
        flipped = flipped.bool()
        out["accuracy_flipped"] = float(correct[flipped].mean())
        if (~flipped).any():
            out["accuracy_clean"] = float(correct[~flipped].mean())
    return out
