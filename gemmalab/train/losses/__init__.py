"""Losses over Gemma's 262,144-entry vocabulary that never hold the (tokens x vocab) logits.

One engine (`vocab.py`) walks the tokens in chunks against the whole vocabulary and lets a small rule
per loss give each token's value and its gradient with respect to the soft-capped logits; the engine
applies the soft-cap's derivative and multiplies the gradient into the hidden and weight gradients.

    ce.py           chunked_cross_entropy (SFT), token_logprobs (+ entropy; policy gradients),
                    score_logprobs (the same without autograd, for scoring)
    kd.py           sparse_kd_loss, full_kd_loss (distillation written as cross-entropy), kd_metrics
    divergences.py  generalized_jsd (GKD's JSD(beta)), forward_kl_loss, reverse_kl_loss
    fy.py           fy_loss, fy_kd_loss: alpha-divergence Fenchel-Young losses (f-softargmax by bisection)

All take the final hidden states (..., d), the tied embedding (V, d) and targets (...) whose entries
equal to `ignore_index` carry no loss, and divide the sum by `normalizer` (default: the local count
of target tokens; pass the global count of the optimizer step under gradient accumulation or
data-parallel all-reduce; see `vocab.normalize`). Each has a `naive_*` full-logits reference.
"""
from .ce import (chunked_cross_entropy, naive_cross_entropy, naive_token_logprobs, score_logprobs,
                 token_logprobs)
from .divergences import (JSD_SCALES, forward_kl_loss, generalized_jsd, naive_generalized_jsd,
                          naive_reverse_kl_loss, reverse_kl_loss)
from .fy import f_softargmax, fy_kd_loss, fy_loss, naive_f_softargmax, naive_fy_loss
from .kd import (NORMALIZERS, WEIGHTINGS, full_kd_loss, kd_metrics, naive_full_kd_loss,
                 naive_sparse_kd_loss, sparse_kd_loss, sparse_target_weights)
from .reward import bt_loss, expected_calibration_error, preference_metrics
from .vocab import as_teacher_fn, vocab_map, vocab_sum

__all__ = ["chunked_cross_entropy", "naive_cross_entropy", "token_logprobs", "score_logprobs",
           "naive_token_logprobs",
           "sparse_kd_loss", "full_kd_loss", "sparse_target_weights", "kd_metrics", "as_teacher_fn",
           "naive_sparse_kd_loss", "naive_full_kd_loss", "NORMALIZERS", "WEIGHTINGS",
           "generalized_jsd", "forward_kl_loss", "reverse_kl_loss", "naive_generalized_jsd",
           "naive_reverse_kl_loss", "JSD_SCALES", "fy_loss", "fy_kd_loss", "f_softargmax",
           "naive_fy_loss", "naive_f_softargmax", "vocab_sum", "vocab_map"]
