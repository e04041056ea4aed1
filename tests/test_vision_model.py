"""Multimodal Gemma 3 vs transformers' Gemma3ForConditionalGeneration (random tiny configs saved with
save_pretrained and read back by gemmalab), the image attention mask, KV cache / chunked prefill /
batches with images, and the parameter counts of the real presets."""
import dataclasses

import pytest
import torch

from gemmalab.checkpoints.hf import read_hf_dir
from gemmalab.config import Gemma3MultimodalConfig, get_multimodal_config
from gemmalab.generate import SamplingParams, chunk_bounds, generate_steps, prefill
from gemmalab.lm import build_model
from gemmalab.model import Gemma3Multimodal
from gemmalab.model.multimodal import image_groups
from gemmalab.model.text import visibility_mask

from .vision_reference import hf_multimodal, token_type_ids

TINY = get_multimodal_config("tiny-vision")  # 16 soft tokens per image, text window 8


def unnamed(c: Gemma3MultimodalConfig) -> Gemma3MultimodalConfig:
    return c.replace(name="", text=c.text.replace(name=""),
                     vision=dataclasses.replace(c.vision, name=""))


def load_pair(tmp_path, mm: Gemma3MultimodalConfig, seed=0):
    """transformers' model and gemmalab's load of the directory it saved."""
    ref = hf_multimodal(mm, seed)
    ref.save_pretrained(tmp_path)
    config, tensors = read_hf_dir(tmp_path, vision=True)
    assert unnamed(config) == unnamed(mm)
    return build_model(config, tensors, torch.float32, torch.device("cpu"), tmp_path), ref


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return load_pair(tmp_path_factory.mktemp("tiny-vision"), TINY)


def image_block(mm):
    return [108, mm.boi_token_id] + [mm.image_token_id] * mm.mm_tokens_per_image + \
        [mm.eoi_token_id, 108]


def sequence(mm, n_images, seed=0, text=(5, 11, 3)):
    """BOS, text, image, text, image, text ... ids (1, T) with n_images images."""
    g = torch.Generator().manual_seed(seed)
    ids = [2]
    for k in range(n_images + 1):
        ids += torch.randint(110, 400, (text[k % len(text)],), generator=g).tolist()
        if k < n_images:
            ids += image_block(mm)
    return torch.tensor([ids])


def pixels(n, seed=0, size=64):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_logits_match_transformers(pair, n_images):
    ours, ref = pair
    ids, px = sequence(TINY, n_images, text=(40, 11, 6)), pixels(n_images)
    assert ids.shape[1] > 4 * TINY.text.sliding_window
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=px if n_images else None,
                       token_type_ids=token_type_ids(ids, TINY)).logits
        got = ours(ids, pixel_values=px if n_images else None)
        causal_only = ref(input_ids=ids, pixel_values=px if n_images else None).logits
    diff = (got - expected).abs().max().item()
    print(f"\n[{n_images} images] max |ours - transformers| = {diff:.2e}")
    assert diff <= 1e-4
    if n_images:  # the bidirectional image attention makes a difference the test can see
        assert (causal_only - expected).abs().max() > 1e-2


def test_soft_tokens_match_transformers_and_are_not_scaled(pair):
    ours, ref = pair
    px = pixels(3, seed=1)
    with torch.no_grad():
        features = ours.image_features(px)
        expected = ref.get_image_features(px).pooler_output
        ids = sequence(TINY, 3)
        x = ours.embed(ids, features)
    assert features.shape == (3, 16, TINY.text.hidden_size)
    assert (features - expected).abs().max() <= 1e-5
    is_image = ids[0] == TINY.image_token_id
    assert torch.equal(x[0, is_image], features.reshape(-1, TINY.text.hidden_size))
    text = ours.language_model.embed_tokens.weight[ids[0, ~is_image]] * TINY.text.hidden_size ** 0.5
    assert torch.allclose(x[0, ~is_image], text)


@pytest.mark.parametrize("window", [24, 64])
def test_images_inside_the_window(tmp_path, window):
    """Windows longer than an image (the real models: 256 soft tokens, W = 1024), sequences longer
    than the window."""
    mm = TINY.replace(text=TINY.text.replace(sliding_window=window))
    ours, ref = load_pair(tmp_path, mm, seed=1)
    ids, px = sequence(mm, 2, text=(20, 35, 30)), pixels(2, seed=2)
    assert ids.shape[1] > window
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=px, token_type_ids=token_type_ids(ids, mm)).logits
        assert (ours(ids, pixel_values=px) - expected).abs().max() <= 1e-4


def test_image_token_outside_the_vocabulary(tmp_path):
    """A 262,144-row vocabulary has no row for <image_soft_token> = 262144: looked up as 0 (10.12)."""
    mm = TINY.replace(image_token_id=262_144)
    ours, ref = load_pair(tmp_path, mm, seed=2)
    ids, px = sequence(mm, 1), pixels(1, seed=3)
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=px, token_type_ids=token_type_ids(ids, mm)).logits
        assert (ours(ids, pixel_values=px) - expected).abs().max() <= 1e-4


def test_mask_bidirectional_inside_each_image_only():
    """Brute force against the rule of spec 2.2 (transformers' composition on local layers)."""
    W = 5
    groups = torch.tensor([[-1, -1, 0, 0, 0, 0, 0, 0, 0, -1, -1, 1, 1, 1, -1]])
    T = groups.shape[1]
    pos = torch.arange(T)[None]
    for window in (None, W):
        mask = visibility_mask(pos, pos, window, image_groups=(groups, groups))[0, 0]
        for q in range(T):
            for k in range(T):
                same_image = groups[0, q] >= 0 and groups[0, q] == groups[0, k]
                want = (k <= q or same_image) and (window is None or k > q - window)
                assert bool(mask[q, k]) == want, (window, q, k)
    full = visibility_mask(pos, pos, None, image_groups=(groups, groups))[0, 0]
    assert full[2, 8] and not full[1, 2]  # an image token sees its image's last token; text does not
    assert not full[4, 11] and full[11, 4]  # an image never sees a later image, later images see it


def test_chunks_never_split_an_image():
    ids = sequence(TINY, 2)
    groups = image_groups(ids, TINY.image_token_id)
    for size in (1, 3, 8, 10, 17, 100):
        bounds = chunk_bounds(ids.shape[1], size, groups)
        assert bounds[0][0] == 0 and bounds[-1][1] == ids.shape[1]
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        for s, e in bounds:
            inside = groups[0, s:e]
            for g in inside[inside >= 0].unique():
                assert (inside == g).sum() == TINY.mm_tokens_per_image
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_a_split_image_is_refused(pair):
    ours, _ = pair
    ids = sequence(TINY, 1)
    cache = ours.make_cache(1, ids.shape[1])
    with pytest.raises(ValueError, match="16 soft tokens in one call"):
        ours(ids[:, :15], cache=cache, image_features=torch.zeros(1, 16, 64))


def cached_logits(model, ids, px, chunk, extra_steps):
    """Chunked prefill (aligned to images) then single text steps, as generate does."""
    mm = model.config
    feats = model.image_features(px)
    embeds, groups = model.embed(ids, feats), image_groups(ids, mm.image_token_id)
    prompt = ids.shape[1] - extra_steps
    cache = model.make_cache(1, ids.shape[1])
    pos = torch.arange(ids.shape[1])[None]
    out = []
    for s, e in chunk_bounds(prompt, chunk, groups[:, :prompt]):
        out.append(model.language_model(ids[:, s:e], pos[:, s:e], cache, inputs_embeds=embeds[:, s:e],
                                        image_groups=groups[:, s:e]))
    for t in range(prompt, ids.shape[1]):
        out.append(model.language_model(ids[:, t:t + 1], pos[:, t:t + 1], cache))
    return torch.cat(out, 1)


@pytest.mark.parametrize("chunk", [3, 7, 13, 512])
def test_cached_decoding_after_images_matches_no_cache(pair, chunk):
    ours, _ = pair
    ids = torch.cat([sequence(TINY, 2), torch.randint(110, 400, (1, 30),
                                                      generator=torch.Generator().manual_seed(4))], 1)
    px = pixels(2, seed=5)
    with torch.no_grad():
        full = ours(ids, pixel_values=px)
        cached = cached_logits(ours, ids, px, chunk, extra_steps=30)
    assert (cached - full).abs().max() <= 1e-4


def test_ragged_batch_with_images_matches_single_prompts(pair):
    """Left-padded prompts with 0, 1 and 2 images: greedy tokens and logits as when run alone."""
    ours, _ = pair
    prompts = [sequence(TINY, 1, seed=6, text=(3, 9)), sequence(TINY, 0, seed=7, text=(12,)),
               sequence(TINY, 2, seed=8, text=(4, 2, 7))]
    images = [pixels(1, seed=9), pixels(0), pixels(2, seed=10)]
    steps = 6

    def run(rows, imgs):
        embeds = [ours.embed(p, ours.image_features(x) if len(x) else None)[0]
                  for p, x in zip(rows, imgs)]
        groups = [image_groups(p, TINY.image_token_id)[0] for p in rows]
        tokens = []
        for tok, _ in generate_steps(ours.language_model, [p[0].tolist() for p in rows], steps,
                                     SamplingParams(temperature=0), chunk_size=5,
                                     inputs_embeds=embeds, image_groups=groups):
            tokens.append(tok)
        return torch.stack(tokens, 1)

    with torch.no_grad():
        batch = run(prompts, images)
        for b, (p, x) in enumerate(zip(prompts, images)):
            alone = run([p], [x])[0]
            assert batch[b].tolist() == alone.tolist()
            seq = torch.cat([p, alone[None, :-1]], 1)
            full = ours(seq, image_features=ours.image_features(x) if len(x) else None)[0]
            assert full[-steps:].argmax(-1).tolist() == alone.tolist()


def test_prefill_with_images_gives_the_last_logits(pair):
    ours, _ = pair
    ids, px = sequence(TINY, 2), pixels(2, seed=11)
    with torch.no_grad():
        embeds = ours.embed(ids, ours.image_features(px))
        groups = image_groups(ids, TINY.image_token_id)
        cache = ours.make_cache(1, ids.shape[1])
        pos = torch.arange(ids.shape[1])[None]
        last = prefill(ours.language_model, cache, ids, pos, 6, embeds, groups)
        assert (last - ours(ids, pixel_values=px)[:, -1]).abs().max() <= 1e-4


# ---- real shapes ------------------------------------------------------------------------------

# [R] Table 1 (millions): vision encoder, embedding, non-embedding
TABLE_1 = {"gemma3-4b": (417, 675, 3_209), "gemma3-12b": (417, 1_012, 10_759),
           "gemma3-27b": (417, 1_416, 25_600)}


@pytest.mark.parametrize("name", list(TABLE_1))
def test_real_presets_build_with_table_1_parameter_counts(name):
    config = get_multimodal_config(name)
    with torch.device("meta"):
        model = Gemma3Multimodal(config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    vision = count(model.vision_tower)
    projector = count(model.multi_modal_projector)
    embedding = model.language_model.embed_tokens.weight.numel()
    non_embedding = count(model.language_model) - embedding
    assert vision == config.vision.num_parameters == 416_866_032
    assert projector == config.projector_parameters
    assert embedding == 262_208 * config.text.hidden_size
    assert non_embedding == config.text.non_embedding_parameters
    want_vision, want_embedding, want_non_embedding = TABLE_1[name]
    assert round(vision / 1e6) == want_vision
    assert round(non_embedding / 1e6) == want_non_embedding
    # The report's "embedding" appears to include the projector matrix (spec 1.1): within 1M.
    assert abs((embedding + projector) / 1e6 - want_embedding) < 1.0
    assert config.mm_tokens_per_image == 256 and config.pooling_kernel == 4
    assert config.tokens_per_image == 260 and config.vision.num_patches == 4096


def test_unknown_multimodal_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="gemma3-4b, gemma3-12b, gemma3-27b"):
        get_multimodal_config("gemma3-1b")
    assert get_multimodal_config("4b").text.vocab_size == 262_208
