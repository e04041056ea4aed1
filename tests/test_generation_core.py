"""The generation core (gemmalab.generate.BatchGenerator, sample_batch) and the cache's own writes."""
import pytest
import torch

from gemmalab.config import get_config
from gemmalab.generate import (BatchGenerator, SamplingParams, filtered_distribution, sample,
                               sample_batch, sample_with_logprob)
from gemmalab.model import Gemma3

PROMPTS = [[5, 6, 7], list(range(10, 40)), [9] * 17, [100, 3]]
EXACT = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)  # the model's own distribution


from .test_generate import tiny  # noqa: E402,F401 - the same tiny random model fixture


@pytest.fixture(scope="module")
def tiny_q8():
    from gemmalab.quant.model import build_quantized
    config = get_config("tiny")
    torch.manual_seed(1)
    ref = Gemma3(config)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return build_quantized(config, {}, {k: v.clone() for k, v in ref.state_dict().items()}, "q8")


class CharTokenizer:
    """Token t decodes to one letter; enough for stop strings and text."""

    class _Decoder:
        def push(self, t):
            return chr(ord("a") + t % 26)

        def flush(self):
            return ""

    def stream_decoder(self):
        return self._Decoder()


def full_logprobs(model, prompt, tokens):
    """log_softmax of one full-sequence forward pass at the generated tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


# ---- the cache owns its writes ----------------------------------------------------------------

def test_append_and_truncate_bookkeeping(tiny):
    c = tiny.make_cache(3, 40)
    R = c.ring_slots
    full, ring = c.append(torch.tensor([0, 2, 2]), torch.tensor([0, 0, 1]))
    assert full.tolist() == [0, 0, 1] and ring.tolist() == [0, 0, 1]
    assert c.lengths.tolist() == [1, 0, 2]
    assert c.full_pos[2, :3].tolist() == [0, 1, -1] and c.ring_pos[0, 0] == 0
    c.append(None, torch.tensor([1, 0, 2]))  # one token for every row
    assert c.lengths.tolist() == [2, 1, 3] and c.full_pos[1, 0] == 0
    c.truncate(2, 1)
    assert c.lengths[2] == 1 and c.full_pos[2].tolist()[:3] == [0, -1, -1]
    assert int((c.ring_pos[2] >= 0).sum()) == 1
    s0, s1, slots, keys = c.rows(1, 2).append_block(torch.arange(1, 6)[None])
    assert (s0, s1) == (1, 6) and keys.shape == (1, R + 5) and c.lengths[1] == 6
    assert c.full_pos[1, :6].tolist() == list(range(6))
    with pytest.raises(ValueError, match="full"):
        small = tiny.make_cache(1, 2)
        small.append(None, torch.tensor([0]))
        small.append(None, torch.tensor([1]))
        small.append(None, torch.tensor([2]))
    c.reset([0, 2])
    assert c.lengths.tolist() == [0, 6, 0] and int(c.full_pos[0].max()) == -1


@pytest.mark.parametrize("which", ["tiny", "tiny_q8"])
def test_copied_row_decodes_like_the_original(which, request):
    model = request.getfixturevalue(which)
    c = model.make_cache(3, 64)
    prompt = list(range(3, 20))
    with torch.inference_mode():
        model(torch.tensor([prompt]), torch.arange(len(prompt))[None], c.rows(0, 1))
    c.copy_row(0, 2)
    assert c.lengths.tolist() == [len(prompt), 0, len(prompt)]
    tok, pos = torch.tensor([7, 7]), torch.tensor([len(prompt)] * 2)
    for _ in range(12):
        with torch.inference_mode():
            logits = model.decode_step(tok, pos, c, rows=torch.tensor([0, 2]))
        assert torch.equal(logits[0], logits[1])
        tok, pos = logits.argmax(-1), pos + 1
    for layer in c.layers:
        assert torch.equal(layer.k[0], layer.k[2]) and torch.equal(layer.v[0], layer.v[2])


# ---- rows are what they would be alone ----------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny", "tiny_q8"])
def test_decode_rows_bit_identical_to_alone(which, request):
    """Logits of each row of a ragged continuous batch == the row decoded in a cache of its own."""
    model = request.getfixturevalue(which)
    gen = BatchGenerator(model, max_batch=4, max_len=64)
    for p in PROMPTS:
        gen.admit(p, SamplingParams(temperature=0), max_tokens=6)
    while gen.prefilling:
        gen.prefill_step()
    # the batch's logits, captured at the model
    seen = []
    decode = model.decode_step

    def spy(tokens, positions, cache, rows=None):
        out = decode(tokens, positions, cache, rows=rows)
        seen.append((tokens.clone(), positions.clone(), rows.clone(), out.clone()))
        return out
    model.decode_step = spy
    try:
        list(gen.run())
    finally:
        del model.decode_step
    for row, p in enumerate(PROMPTS):
        alone = model.make_cache(1, 64)
        with torch.inference_mode():
            model(torch.tensor([p]), torch.arange(len(p))[None], alone)
            for tokens, positions, rows, out in seen:
                i = rows.tolist().index(row)
                ref = model.decode_step(tokens[i:i + 1], positions[i:i + 1], alone)
                assert torch.equal(ref[0], out[i])


def test_samples_bit_identical_to_alone_and_seeded(tiny):
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)
    together = sample_batch(tiny, PROMPTS, n=3, max_new_tokens=12, params=params, seed=11,
                            max_batch=5)
    assert [(s.prompt_index, s.index) for s in together] == [(j, i) for j in range(4) for i in range(3)]
    for j, p in enumerate(PROMPTS):
        alone = sample_batch(tiny, [p], n=3, max_new_tokens=12, params=params, seed=11 + 3 * j)
        for a, b in zip(alone, together[3 * j:3 * j + 3]):
            assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    again = sample_batch(tiny, PROMPTS, n=3, max_new_tokens=12, params=params, seed=11)
    assert [s.token_ids for s in again] == [s.token_ids for s in together]
    # the choices of one prompt differ (own seeds), and another seed gives other samples
    assert len({tuple(s.token_ids) for s in together[:3]}) > 1
    other = sample_batch(tiny, PROMPTS, n=3, max_new_tokens=12, params=params, seed=12)
    assert [s.token_ids for s in other] != [s.token_ids for s in together]


def test_first_choice_samples_like_plain_sampling(tiny):
    """Choice 0 of a seeded prompt draws what `sample` draws with a generator seeded `seed`."""
    params = SamplingParams(temperature=0.8, top_k=30, top_p=0.95, seed=4)
    got = sample_batch(tiny, [PROMPTS[1]], n=2, max_new_tokens=10, params=params)[0]
    seq, g = list(PROMPTS[1]), torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(sample(tiny(torch.tensor([seq]))[:, -1], params, g)[0]))
    # full forward vs cached decode may differ in the last bits; the draws rarely notice
    assert got.token_ids == seq[len(PROMPTS[1]):]


# ---- log-probs of the sampling distribution -----------------------------------------------------

def test_sampling_logprobs_equal_full_forward(tiny):
    out = sample_batch(tiny, PROMPTS, n=2, max_new_tokens=16, params=EXACT, seed=3)
    for s in out:
        ref = full_logprobs(tiny, PROMPTS[s.prompt_index], s.token_ids)
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=1e-5, rtol=0)


def test_filtered_logprobs_are_those_of_the_filtered_distribution(tiny):
    params = SamplingParams(temperature=0.7, top_k=8, top_p=0.8)
    for s in sample_batch(tiny, PROMPTS[:2], n=2, max_new_tokens=8, params=params, seed=5):
        prompt = PROMPTS[s.prompt_index]
        with torch.no_grad():
            logits = tiny(torch.tensor([prompt + s.token_ids]))[0, len(prompt) - 1:-1]
        probs, index = filtered_distribution(logits, params)
        for t, (tok, lp) in enumerate(zip(s.token_ids, s.logprobs)):
            where = (index[t] == tok).nonzero()
            assert len(where) and probs[t, where[0, 0]] > 0
            assert abs(lp - float(probs[t, where[0, 0]].log())) < 1e-4
    tokens, lp = sample_with_logprob(torch.randn(3, 50), SamplingParams(temperature=0))
    assert torch.equal(lp, torch.zeros(3))


@pytest.mark.slow
def test_sampling_logprobs_equal_full_forward_real_270m(lm):
    prompts = [lm.tokenizer.encode(p, add_bos=True)
               for p in ["The capital of France is", "def add(a, b):"]]
    for s in sample_batch(lm.model, prompts, n=2, max_new_tokens=8, params=EXACT, seed=0):
        ref = full_logprobs(lm.model, prompts[s.prompt_index], s.token_ids)
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=1e-4, rtol=0)


# ---- finish reasons ---------------------------------------------------------------------------

def test_finish_reasons(tiny):
    greedy = SamplingParams(temperature=0)
    free = sample_batch(tiny, [PROMPTS[0]], max_new_tokens=10, params=greedy)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    stop = free.token_ids[4]
    cut = free.token_ids.index(stop) + 1
    by_id = sample_batch(tiny, [PROMPTS[0]], max_new_tokens=10, params=greedy, stop_ids=[stop])[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[:cut]
    tok = CharTokenizer()
    text = sample_batch(tiny, [PROMPTS[0]], max_new_tokens=10, params=greedy, tokenizer=tok)[0].text
    assert text == "".join(chr(ord("a") + t % 26) for t in free.token_ids)
    s = sample_batch(tiny, [PROMPTS[0]], max_new_tokens=10, params=greedy, tokenizer=tok,
                     stop=[text[3:5]])[0]
    assert s.finish_reason == "stop" and s.text == text[:text.index(text[3:5])]
    # the context caps a sequence at "length"
    ctx = tiny.config.max_position_embeddings
    capped = sample_batch(tiny, [[1] * (ctx - 3)], max_new_tokens=50, params=greedy)[0]
    assert capped.finish_reason == "length" and len(capped.token_ids) == 3


def test_cancel_and_errors_free_rows(tiny):
    gen = BatchGenerator(tiny, max_batch=4, max_len=64, catch_errors=True)
    a = gen.admit(PROMPTS[0], SamplingParams(temperature=0), n=2, max_tokens=30)
    bad = gen.admit(PROMPTS[1], SamplingParams(temperature=1.0, top_p=5e-324), max_tokens=30)
    assert not gen.can_admit(2)
    events = gen.step() + gen.step()
    assert [e.finish_reason for e in events if e.group is bad] == ["error"]
    events = gen.cancel(a)
    assert sorted(e.index for e in events if e.finish_reason == "cancelled") == [0, 1]
    assert gen.idle and sorted(gen.free_rows) == [0, 1, 2, 3]
    gen.admit(PROMPTS[0], n=4)
    with pytest.raises(ValueError, match="rows"):
        gen.admit(PROMPTS[0])
    with pytest.raises(ValueError, match="n must be"):
        gen.admit(PROMPTS[0], n=5)


def test_long_prefill_dequantizes_each_weight_once(tiny_q8, monkeypatch):
    """Chunked prefill of a quantized model: inside prefill() every QuantLinear dequantizes once for
    all chunks (bulk_weights), with the same logits as dequantizing per chunk."""
    from gemmalab.generate import prefill
    from gemmalab.quant import linear

    calls = []
    original = linear.QuantLinear.dequantized
    monkeypatch.setattr(linear.QuantLinear, "dequantized", lambda self: calls.append(self) or original(self))
    ids = torch.randint(0, tiny_q8.config.vocab_size, (1, 100), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(100)[None]

    def run(budget):
        monkeypatch.setattr(linear, "BULK_CACHE_BYTES", budget)
        calls.clear()
        out = prefill(tiny_q8, tiny_q8.make_cache(1, 101), ids, pos, chunk_size=40)  # chunks of 40, 40, 20
        return out, list(calls)

    cached, once = run(1 << 30)
    uncached, every = run(0)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)
    n_linear = sum(isinstance(m, linear.QuantLinear) for m in tiny_q8.layers.modules())
    assert len(once) == len(set(once)) == n_linear  # the three chunks shared one dequantization each
    assert len(every) == 2 * n_linear  # once per chunk of > 32 rows (the last, 20 rows, runs the integer kernels)


def test_quantized_prefill_attention_runs_in_the_bulk_dtype(tiny_q8, monkeypatch):
    """Prefill attention of a quantized model follows the many-row products' dtype (bf16 where the
    CPU has it, GEMMALAB_CPU_BF16 overrides): close to fp32, not equal; decode rows stay fp32."""
    from gemmalab.generate import prefill
    from gemmalab.model.text import Attention

    attn = [m for m in tiny_q8.modules() if isinstance(m, Attention)]
    assert attn and all(m.bulk_rows == 32 for m in attn)
    seen = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, _f=torch.nn.functional.scaled_dot_product_attention, **k:
                        seen.append(q.dtype) or _f(q, *a, **k))
    ids = torch.randint(0, tiny_q8.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(4))
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("GEMMALAB_CPU_BF16", flag)
        seen.clear()
        out[flag] = torch.log_softmax(prefill(tiny_q8, tiny_q8.make_cache(1, 65), ids, torch.arange(64)[None]), -1)
        assert set(seen) == {torch.float32 if flag == "0" else torch.bfloat16}
    assert not torch.equal(out["0"], out["1"])
    kl = (out["0"].exp() * (out["0"] - out["1"])).sum(-1).item()
    assert 0 <= kl < 0.02, kl
