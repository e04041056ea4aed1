"""Decoder parity with transformers on tiny random configs, and cache vs no-cache equivalence."""
import pytest
import torch

from gemmalab.config import FULL, get_config
from gemmalab.generate import left_pad
from gemmalab.model.cache import RING_HEADROOM
from gemmalab.model import Gemma3
from gemmalab.model.text import visibility_mask

from .hf_reference import hf_model, our_state_dict

TINY = ["tiny", "tiny-27b-style", "tiny-gemma2"]


def pair(name, seed=0):
    config = get_config(name)
    ref = hf_model(config, seed)
    ours = Gemma3(config)
    ours.load_state_dict(our_state_dict(ref))
    return config, ours.eval(), ref


@pytest.mark.parametrize("name", TINY)
def test_logits_match_transformers(name):
    config, ours, ref = pair(name)
    T = 5 * config.sliding_window + 3  # well past 2x the window
    ids = torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_tiny_configs_cover_the_features():
    assert get_config("tiny-gemma2").attn_logit_softcapping == 50.0
    assert get_config("tiny-gemma2").final_logit_softcapping == 30.0
    assert get_config("tiny-27b-style").rope_scaling_factor == 8.0
    c = get_config("tiny-27b-style")
    assert c.query_pre_attn_scalar != c.head_dim
    assert FULL in get_config("tiny").layer_types


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("chunk", [3, 8, 13])
def test_cached_decoding_matches_no_cache(name, chunk):
    """Chunked prefill (chunks smaller, equal to and larger than W), then single steps far past W."""
    config, ours, _ = pair(name)
    W = config.sliding_window
    prompt, total = 2 * W + 5, 7 * W
    ids = torch.randint(0, config.vocab_size, (2, total), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.make_cache(2, total)
        outs = [ours(ids[:, s:min(s + chunk, prompt)], cache=cache) for s in range(0, prompt, chunk)]
        outs += [ours(ids[:, t:t + 1], cache=cache) for t in range(prompt, total)]
    diff = (torch.cat(outs, 1) - full).abs().max().item()
    assert diff <= 1e-4, diff


def test_ragged_batch_matches_single_sequences():
    config, ours, _ = pair("tiny")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (5, 23, 14)]
    ids, pos = left_pad(prompts, config.pad_token_id)
    steps = 12
    with torch.no_grad():
        cache = ours.make_cache(3, ids.shape[1] + steps)
        batch_logits = [ours(ids, pos, cache)[:, -1]]
        nxt = batch_logits[0].argmax(-1)
        p = pos[:, -1] + 1
        tokens = [nxt]
        for _ in range(steps - 1):
            batch_logits.append(ours(nxt[:, None], p[:, None], cache)[:, -1])
            nxt, p = batch_logits[-1].argmax(-1), p + 1
            tokens.append(nxt)
        batch_tokens = torch.stack(tokens, 1)
        for b, prompt in enumerate(prompts):
            seq = list(prompt)
            for t in range(steps):
                logits = ours(torch.tensor([seq]))[0, -1]
                assert (logits - batch_logits[t][b]).abs().max() <= 1e-4
                seq.append(int(logits.argmax()))
            assert seq[len(prompt):] == batch_tokens[b].tolist()


def test_local_layers_see_exactly_w_keys():
    W = 4
    q = torch.arange(12)[None]
    mask = visibility_mask(q, q, W)[0, 0]
    assert mask[10].nonzero().flatten().tolist() == [7, 8, 9, 10]  # q - W < k <= q
    assert mask.sum(-1).max().item() == W
    assert visibility_mask(q, q, None)[0, 0, 10].sum().item() == 11  # global: causal


@pytest.mark.parametrize("name", ["gemma3-270m", "gemma3-1b", "gemma3-27b", "gemma2-27b"])
def test_cache_bytes_equal_the_formula(name):
    config = get_config(name)
    with torch.device("meta"):
        model = Gemma3(config)
    for T in (100, 4096, 32768):
        T = min(T, config.max_position_embeddings)
        for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
            with torch.device("meta"):
                exact = model.make_cache(1, T, dtype=dtype, ring_headroom=0)
                cache = model.make_cache(1, T, dtype=dtype)  # the default, with ring headroom
            assert exact.nbytes() == config.kv_cache_bytes(T, size)
            local = [layer.slots for layer in exact.layers if layer.ring]
            assert set(local) == {min(config.sliding_window, T)}
            local = [layer.slots for layer in cache.layers if layer.ring]
            assert set(local) == {config.sliding_window + RING_HEADROOM}
            if T >= 4096:  # the headroom (speculative decoding) costs < 5% over the formula
                assert 1.0 <= cache.nbytes() / config.kv_cache_bytes(T, size) < 1.05


def test_bf16_forward_runs_and_tracks_fp32():
    config, ours, _ = pair("tiny")
    ids = torch.randint(0, config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = ours(ids)
        low = ours.to(torch.bfloat16)(ids).float()
    assert torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("name", ["tiny", "tiny-gemma2"])
def test_packed_documents_are_isolated(name):
    """Several documents in one row, positions restarting, give each document's own logits."""
    config, ours, _ = pair(name)
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, config.vocab_size, (n,), generator=g) for n in (7, 20, 11)]
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    segments = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = ours(ids, positions, segment_ids=segments)[0]
        alone = torch.cat([ours(d[None])[0] for d in docs])
        leaky = ours(ids, positions)[0]  # without segments the later documents see earlier ones
    assert (packed - alone).abs().max() <= 1e-4
    assert (leaky - alone).abs().max() > 1e-2
