"""Sampling, stop handling and batched generation on a tiny random model."""
import pytest
import torch

from gemmalab.config import get_config
from gemmalab.generate import (PromptTooLongError, SamplingParams, StopStrings, generate_steps,
                               sample)
from gemmalab.model import Gemma3


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Gemma3(get_config("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def run(model, prompts, n, params, stop_ids=()):
    return torch.stack([t for t, _ in generate_steps(model, prompts, n, params, stop_ids)], 1)


def test_greedy_is_argmax_and_deterministic(tiny):
    greedy = SamplingParams(temperature=0)
    a = run(tiny, [[1, 2, 3, 4]], 20, greedy)
    seq = [1, 2, 3, 4]
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(tiny(torch.tensor([seq]))[0, -1].argmax()))
    assert a[0].tolist() == seq[4:]


def test_batch_of_ragged_prompts_equals_one_at_a_time(tiny):
    prompts = [[5, 6, 7], list(range(10, 40)), [9] * 17, [100]]
    greedy = SamplingParams(temperature=0)
    batch = run(tiny, prompts, 25, greedy)
    for b, p in enumerate(prompts):
        assert batch[b].tolist() == run(tiny, [p], 25, greedy)[0].tolist()


def test_seeded_sampling_is_reproducible(tiny):
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=123)
    a, b = run(tiny, [[1, 2]], 30, params), run(tiny, [[1, 2]], 30, params)
    assert torch.equal(a, b)
    other = run(tiny, [[1, 2]], 30, SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7))
    assert not torch.equal(a, other)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    picks = sample(logits, SamplingParams(temperature=1.0, top_k=3, top_p=1.0), g)
    assert set(picks.tolist()) == {0, 1, 2}
    # probabilities of the top tokens: .64, .23, .09...; top_p=0.8 keeps the first two
    picks = sample(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.8), g)
    assert set(picks.tolist()) == {0, 1}
    picks = sample(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0), g)
    assert set(picks.tolist()) == set(range(6))
    freq0 = (picks == 0).float().mean().item()
    assert abs(freq0 - torch.softmax(logits[0], 0)[0].item()) < 0.04
    assert sample(logits[:1], SamplingParams(temperature=0)).item() == 0


def test_stop_tokens_end_rows(tiny):
    greedy = SamplingParams(temperature=0)
    free = run(tiny, [[1, 2, 3]], 10, greedy)[0].tolist()
    stop = free[4]
    steps = list(generate_steps(tiny, [[1, 2, 3]], 10, greedy, stop_ids=[stop]))
    assert len(steps) == free.index(stop) + 1 and bool(steps[-1][1].all())


def test_prompt_longer_than_context_is_refused(tiny):
    ctx = tiny.config.max_position_embeddings
    with pytest.raises(PromptTooLongError, match=f"{ctx}"):
        list(generate_steps(tiny, [[1] * ctx], 5, SamplingParams(temperature=0)))
    with pytest.raises(ValueError):
        list(generate_steps(tiny, [[]], 5, SamplingParams(temperature=0)))
    # max_new_tokens is capped by the context instead of overflowing the cache
    assert len(list(generate_steps(tiny, [[1] * (ctx - 3)], 50, SamplingParams(temperature=0)))) == 3


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0),
                                 dict(top_p=1.5)])
def test_bad_sampling_values(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_stop_strings_hold_back_partial_matches():
    s = StopStrings(["STOP", "\n\n"])
    out = []
    for piece in ["Hello S", "T", "ill ", "going ST", "OP now"]:
        text, hit = s.push(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "Hello STill going " and hit
    s = StopStrings(["abc"])
    assert s.push("xxab") == ("xx", False)
    assert s.push("d") == ("abd", False)
    assert s.flush() == ""
