"""Rollouts: N samples per prompt as training rows, the sampler's log-probs equal the trainer's
recomputed ones with the exact fp32 sampler (ratios 1, the corrected loss equals the plain one), a
mismatched sampler is measured and its ratios truncated, rows do not depend on their batch."""
import copy

import pytest
import torch

from gemmalab.config import get_config
from gemmalab.generate import SamplingParams, sample_batch
from gemmalab.model import Gemma3
from gemmalab.train.build import init_weights
from gemmalab.train.rollout import (learner_logprobs, mismatch_metrics, policy_gradient_loss, rollout,
                                    truncated_ratios)

PROMPTS = [[2, 17, 33, 40], [2, 90, 91], [2, 5, 6, 7, 8, 9]]
EXACT = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Gemma3(get_config("tiny"))
    init_weights(m, std=0.2)  # peaked distributions: samples are not uniform noise
    return m.eval()


def test_fp32_sampler_logprobs_equal_the_learners_and_ratios_are_one(model):
    ro = rollout(model, PROMPTS, n=3, max_new_tokens=10, params=EXACT, seed=11, seq_len=24)
    assert ro.rows["input_ids"].shape == (9, 24)
    assert ro.group.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert int(ro.mask.sum()) == int(ro.completion_lens.sum()) > 0
    lp = learner_logprobs(model, ro.rows)
    torch.testing.assert_close(lp[ro.mask], ro.sampler_logprobs[ro.mask], rtol=0, atol=2e-5)
    assert (ro.sampler_logprobs[~ro.mask] == 0).all()
    m = mismatch_metrics(ro.sampler_logprobs, lp, ro.mask)
    assert abs(m["mismatch_kl_k1"]) < 1e-5 and m["mismatch_kl_k3"] < 1e-9
    r = truncated_ratios(lp, ro.sampler_logprobs, ro.mask, cap=2.0)
    torch.testing.assert_close(r, torch.ones_like(r), rtol=0, atol=5e-5)

    # the corrected policy-gradient loss equals the plain one, in value and gradient
    adv = torch.randn(9, generator=torch.Generator().manual_seed(0))
    n = float(ro.mask.sum())
    grads = []
    for ratios in (None, r):
        model.zero_grad()
        lp = learner_logprobs(model, ro.rows)
        loss = policy_gradient_loss(lp, adv, ro.mask, n, ratios)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-6)
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-3, atol=1e-6)
    model.zero_grad()


def test_rows_do_not_depend_on_their_batch(model):
    ro = rollout(model, PROMPTS, n=2, max_new_tokens=8, params=EXACT, seed=5, seq_len=20)
    for j, p in enumerate(PROMPTS):
        alone = sample_batch(model, [p], n=2, max_new_tokens=8, params=EXACT, seed=5 + j * 2)
        for i, s in enumerate(alone):
            row = ro.rows["input_ids"][j * 2 + i]
            assert row[len(p):len(p) + len(s.token_ids)].tolist() == s.token_ids
            lp = ro.sampler_logprobs[j * 2 + i, len(p) - 1:len(p) - 1 + len(s.token_ids)]
            assert torch.equal(lp, torch.tensor(s.logprobs, dtype=torch.float32))


def test_a_mismatched_sampler_is_measured_and_its_ratios_truncated(model):
    sampler = copy.deepcopy(model)
    with torch.no_grad():
        for p in sampler.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ro = rollout(sampler, PROMPTS, n=4, max_new_tokens=10, params=EXACT, seed=3, seq_len=24)
    lp = learner_logprobs(model, ro.rows)
    m = mismatch_metrics(ro.sampler_logprobs, lp, ro.mask)
    assert m["mismatch_kl_k3"] > 1e-3 and m["mismatch_max_abs_logratio"] > 0.05
    r = truncated_ratios(lp, ro.sampler_logprobs, ro.mask, cap=1.5)
    raw = (lp.detach() - ro.sampler_logprobs).exp()[ro.mask]
    assert r.max() <= 1.5 and (raw > 1.5).any()  # truncation bites on this sampler
    torch.testing.assert_close(r[ro.mask], raw.clamp(max=1.5))
    assert not r.requires_grad
    assert torch.equal(truncated_ratios(lp, ro.sampler_logprobs, ro.mask, cap=0), torch.ones_like(r))
