"""REINFORCE / RLOO estimators and reward combination on exact categorical policies (no sequences):
pi = softmax(theta) over K "responses" with fixed rewards, where every expectation and KL is exact.

- RLOO with k1 KL in the reward: its gradient equals the exact gradient of E[r] - beta KL(pi || ref)
  in expectation (4.5-standard-error test over 20,000 groups, like the distillation estimator tests);
- "k3 in the loss" (GRPO's form) is biased: its mean gradient misses the exact KL gradient by many
  standard errors (TRL #4637, verl PR #2953);
- with beta = 0 the policy converges to the best arm; with beta > 0 to pi_ref exp(r / beta) / Z;
- the Inada transform is increasing, concave, C1 at its threshold and the identity at theta = phi = 0;
  combined values are None when any term could not score a sample.
"""
import math

import pytest
import torch

from gemmalab.train.losses.policy import (reinforce_advantages, rloo_advantages, sequence_kl_k1,
                                          token_kl_k3)
from gemmalab.train.rewards import RewardResult, failed
from gemmalab.train.rewards.combine import Term, combine, inada

K = 6
R = torch.tensor([0.1, 0.9, 0.3, 0.0, 0.5, 0.7], dtype=torch.float64)
REF = torch.softmax(torch.tensor([0.5, -0.3, 0.2, 0.1, -0.1, 0.0], dtype=torch.float64), 0)
THETA = torch.tensor([0.3, -0.2, 0.6, 0.0, -0.4, 0.1], dtype=torch.float64)


def exact_objective_grad(theta, beta):
    t = theta.clone().requires_grad_(True)
    p = torch.softmax(t, 0)
    j = (p * R).sum() - beta * (p * (p.log() - REF.log())).sum()
    j.backward()
    return t.grad


def rloo_grad_draws(theta, beta, groups, G, gen):
    """Per group: the gradient of the objective the RLOO surrogate estimates,
    (1/G) sum_i A_i grad log pi(a_i), with grad log pi(a) = e_a - pi."""
    p = torch.softmax(theta, 0)
    a = torch.multinomial(p.expand(groups, K), G, replacement=True, generator=gen)  # (groups, G)
    logp, logref = p.log()[a], REF.log()[a]
    kl = sequence_kl_k1(logp[..., None], logref[..., None], torch.ones_like(logp[..., None], dtype=torch.bool))
    total = R[a] - beta * kl
    adv = rloo_advantages(total, torch.ones_like(total, dtype=torch.bool))
    onehot = torch.nn.functional.one_hot(a, K).double()
    return (adv[..., None] * (onehot - p)).mean(1)  # (groups, K)


def test_rloo_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.5], [2.0, 2.0, 2.0]])
    adv = rloo_advantages(r, torch.ones_like(r, dtype=torch.bool))
    torch.testing.assert_close(adv, torch.tensor([[0.75, -0.75, 0.0], [0.0, 0.0, 0.0]]))
    # an unscorable sample: advantage 0, left out of the others' baselines
    valid = torch.tensor([[True, False, True], [True, False, False]])
    adv = rloo_advantages(r, valid)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.0, -0.5], [0.0, 0.0, 0.0]]))
    assert torch.equal(reinforce_advantages(r, valid), torch.where(valid, r, torch.zeros_like(r)))
    with pytest.raises(ValueError, match="prompts, samples"):
        rloo_advantages(r[0], valid[0])


@pytest.mark.parametrize("beta,G", [(0.0, 2), (0.3, 4)])
def test_rloo_gradient_is_the_exact_policy_gradient_in_expectation(beta, G):
    gen = torch.Generator().manual_seed(1)
    draws = rloo_grad_draws(THETA, beta, 20_000, G, gen)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    exact = exact_objective_grad(THETA, beta)
    z = ((mean - exact).abs() / se).max()
    assert z < 4.5, (mean, exact, z)
    assert exact.abs().max() > 10 * se.max()  # the test has power: the gradient is far from 0


def test_k3_in_the_loss_is_a_biased_kl_gradient():
    """The pathwise gradient of k3 along samples of pi, averaged, vs the exact gradient of
    KL(pi || ref): they differ by many standard errors (it estimates the forward KL's gradient)."""
    gen = torch.Generator().manual_seed(2)
    p = torch.softmax(THETA, 0)
    n = 20_000
    a = torch.multinomial(p, n, replacement=True, generator=gen)
    grads = []
    for k in range(K):  # the gradient of k3(a) for each arm; the draws pick among them
        t = THETA.clone().requires_grad_(True)
        token_kl_k3(torch.log_softmax(t, 0)[k], REF.log()[k]).backward()
        grads.append(t.grad)
    draws = torch.stack(grads)[a]
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(n)
    t = THETA.clone().requires_grad_(True)
    q = torch.softmax(t, 0)
    (q * (q.log() - REF.log())).sum().backward()
    assert ((mean - t.grad).abs() / se).max() > 10


def _train(beta, steps, lr=0.1, seed=0):
    theta = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        p = torch.softmax(theta, 0)
        a = torch.multinomial(p.detach().expand(32, K), 4, replacement=True, generator=gen)
        logp = torch.log_softmax(theta, 0)[a]
        kl = (logp.detach() - REF.log()[a])
        adv = rloo_advantages(R[a] - beta * kl, torch.ones_like(kl, dtype=torch.bool))
        loss = -(adv * logp).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(theta.detach(), 0)


def test_beta_0_converges_to_the_best_arm():
    p = _train(beta=0.0, steps=400)
    assert p[int(R.argmax())] > 0.95, p


def test_beta_positive_converges_to_the_kl_regularised_optimum():
    beta = 0.5
    target = REF * torch.exp(R / beta)
    target = target / target.sum()
    p = _train(beta=beta, steps=1500, lr=0.03)
    kl = float((p * (p.log() - target.log())).sum())
    assert kl < 5e-3, (p, target, kl)


def test_inada_transform_shape():
    xs = [i / 100 for i in range(0, 201)]
    for low_only in (False, True):
        u = [inada(x, tau=0.5, low_only=low_only) for x in xs]
        assert all(b > a for a, b in zip(u, u[1:]))  # increasing
        d = [b - a for a, b in zip(u, u[1:])]
        assert all(d2 <= d1 + 1e-12 for d1, d2 in zip(d, d[1:]))  # concave
        assert inada(0.5, tau=0.5, low_only=low_only) == pytest.approx(0.5)  # r at the threshold
        h = 1e-6  # slope 1 on both sides of tau (C1)
        assert (inada(0.5 + h, tau=0.5) - 0.5) / h == pytest.approx(1.0, rel=1e-4)
        assert (0.5 - inada(0.5 - h, tau=0.5)) / h == pytest.approx(1.0, rel=1e-4)
    # steep at the floor, flat far above: more sensitive to low rewards than to high ones
    assert inada(0.1, tau=0.5) - inada(0.0, tau=0.5) > 5 * (inada(1.0, tau=0.5) - inada(0.9, tau=0.5))
    assert [inada(x, tau=0.5, theta=0, phi=0) for x in (0.2, 0.9)] == pytest.approx([0.2, 0.9])
    assert inada(1.5, tau=0.5, low_only=True) == pytest.approx(1.5)  # partial: identity above tau
    with pytest.raises(ValueError, match="above the floor"):
        inada(0.3, tau=0.0)


class Const:
    def __init__(self, name, values):
        self.name, self.values = name, values

    def __call__(self, problems, completions):
        return [v if isinstance(v, RewardResult) else RewardResult(v) for v in self.values]


def test_combine_weights_normalisation_and_unscored():
    a = Const("a", [1.0, 0.0, 0.5])
    b = Const("b", [10.0, 30.0, failed("timeout", "slow")])
    terms = [Term(a, weight=2.0), Term(b, weight=0.1)]
    values, raw = combine(terms, [t.reward(None, None) for t in terms])
    assert values[:2] == pytest.approx([3.0, 3.0]) and values[2] is None
    assert raw == {"a": [1.0, 0.0, 0.5], "b": [10.0, 30.0, None]}
    terms = [Term(a, normalize="batch"), Term(b, normalize="batch")]
    values, _ = combine(terms, [t.reward(None, None) for t in terms])
    za = [(1.0 - 0.5) / math.sqrt(1 / 6), (0.0 - 0.5) / math.sqrt(1 / 6)]
    assert values[:2] == pytest.approx([za[0] - 1.0, za[1] + 1.0])
    inada_term = Term(a, transform="inada", tau=0.5)
    values, _ = combine([inada_term], [a(None, None)])
    assert values == pytest.approx([inada(1.0, tau=0.5), inada(0.0, tau=0.5), 0.5])
    for bad, msg in [(dict(transform="crra"), "unknown reward transform"),
                     (dict(normalize="z"), "unknown normalisation"),
                     (dict(transform="inada", tau=0.0), "above the floor"),
                     (dict(weight=float("nan")), "finite")]:
        with pytest.raises(ValueError, match=msg):
            Term(a, **bad)
    with pytest.raises(ValueError, match="needs a value"):
        RewardResult(None, "ok")
    with pytest.raises(ValueError, match="has no value"):
        RewardResult(1.0, "timeout")


def test_reward_cache_scores_each_pair_once_and_round_trips():
    from gemmalab.train.rewards import Problem, RewardCache

    calls = []

    class Counting:
        name = "count"

        def __call__(self, problems, completions):
            calls.append(list(completions))
            return [RewardResult(float(len(c)), components={"n": len(c)}) for c in completions]

    p = [Problem("f/t/0/0", "say", "f"), Problem("f/t/0/1", "say more", "f")]
    cache = RewardCache()
    r1 = cache.score(Counting(), [p[0], p[0], p[1]], ["ab", "ab", "ab"])
    assert [r.value for r in r1] == [2.0, 2.0, 2.0] and calls == [["ab", "ab"]]  # duplicates scored once
    r2 = cache.score(Counting(), [p[0], p[1]], ["ab", "abc"])
    assert calls[-1] == ["abc"] and [r.value for r in r2] == [2.0, 3.0]
    assert (cache.hits, cache.misses) == (2, 3)
    again = RewardCache()
    again.load_state_dict(cache.state_dict())
    again.score(Counting(), [p[1]], ["abc"])
    assert len(calls) == 2 and again.hits == cache.hits + 1
    with pytest.raises(ValueError, match="2 problems but 1 completions"):
        cache.score(Counting(), p, ["x"])
