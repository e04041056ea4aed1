import math

import pytest

from gemmalab.config import FULL, PRESETS, SLIDING, get_config


def test_published_numbers():
    c = get_config("270m")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.intermediate_size, c.sliding_window) == (18, 640, 4, 1, 256, 2048, 512)
    assert [i for i, t in enumerate(c.layer_types) if t == FULL] == [5, 11, 17]
    assert c.rope_scaling_factor == 1.0 and c.rope_theta == 1e6 and c.rope_local_base_freq == 1e4
    assert get_config("1b").sliding_window == 512
    for name in ("gemma3-4b", "gemma3-12b", "gemma3-27b"):
        c = get_config(name)
        assert c.sliding_window == 1024 and c.rope_scaling_factor == 8.0
        assert c.max_position_embeddings == 131_072
    assert get_config("27b").query_pre_attn_scalar == 168 and get_config("27b").head_dim == 128
    assert get_config("4b").layer_types[30:] == (SLIDING,) * 4  # the remainder is local


def test_parameter_counts_match_the_report():
    # Table 1 of the report (spec 1.1): embedding / non-embedding parameters
    for name, emb, non_emb in [("1b", 302e6, 698e6), ("4b", 675e6, 3209e6),
                               ("12b", 1012e6, 10759e6), ("27b", 1416e6, 25600e6)]:
        c = get_config(name)
        assert math.isclose(c.non_embedding_parameters, non_emb, rel_tol=2e-3), name
        assert math.isclose(c.embedding_parameters, emb, rel_tol=1e-2), name


def test_gemma2_presets():
    for name, layers in [("gemma2-2b", 26), ("gemma2-9b", 42), ("gemma2-27b", 46)]:
        c = PRESETS[name]
        assert c.num_hidden_layers == layers and c.sliding_window == 4096
        assert c.attn_logit_softcapping == 50.0 and c.final_logit_softcapping == 30.0
        assert c.layer_types[:4] == (SLIDING, FULL, SLIDING, FULL)
        assert not c.use_qk_norm
    assert PRESETS["gemma2-27b"].query_pre_attn_scalar == 144


def test_kv_formula_matches_spec_table():
    gib = 2 ** 30
    assert round(get_config("1b").kv_cache_bytes(32768) / gib, 2) == 0.14
    assert round(get_config("4b").kv_cache_bytes(131072) / gib, 2) == 2.61
    assert round(get_config("27b").kv_cache_bytes(32768, hybrid=False) / gib, 1) == 15.5


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="gemma3-270m"):
        get_config("gemma3-7b")


def test_config_is_frozen_and_validated():
    c = get_config("tiny")
    with pytest.raises(Exception):
        c.hidden_size = 3
    with pytest.raises(ValueError):
        c.replace(layer_types=("bogus",) * c.num_hidden_layers)
    assert c.replace(num_hidden_layers=12).layer_types.count(FULL) == 2
