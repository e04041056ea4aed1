"""Export to Hugging Face directories and GGUF files: what transformers, gemmalab (and llama.cpp's
conventions) read back.

Tiny random models (Gemma 3 with linear RoPE scaling, Gemma 2 with soft-capping) carry a tiny
Gemma-like tokenizer (512 pieces: Gemma's specials, 256 byte pieces, BPE pieces learned below), so
vocabulary and embedding rows agree; the real tokenizer is checked through the real 270M.

Tolerances. HF export: transformers' logits within 1e-4 of ours (same weights, different kernels);
gemmalab reloads are bit-identical. GGUF: norms are stored as 1 + w in F32 (llama.cpp's convention),
so the reference for a GGUF reload is our model with norms rounded through (w + 1) - 1 and 2-D
weights rounded through the format (f16 cast; Q8_0 quantize + dequantize with gguf.quants); the
reload must equal it bit for bit. Against the unrounded model, only a sanity bound: |logit error| <=
1e-2 x max|logit| (f16) and 1e-1 x max|logit| (q8_0) on random tiny models (measured 2e-3 and 5e-2:
random norm gains amplify rounding), 2e-3 x max|logit| for the real 270M in f16.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import gguf
import numpy as np
import pytest
import torch
import transformers

import gemmalab
from gemmalab.checkpoints import gguf as gguf_ckpt
from gemmalab.checkpoints.export import CHAT_TEMPLATE, ours_to_gguf, save_gguf, save_hf
from gemmalab.checkpoints.gguf_file import GGUFFile
from gemmalab.checkpoints.hf import config_to_hf
from gemmalab.config import get_config
from gemmalab.lm import LM, build_model
from gemmalab.model import Gemma3
from gemmalab.tokenizer import Tokenizer

from .hf_reference import hf_model, our_state_dict

CPU = torch.device("cpu")
Q8_0 = gguf.GGMLQuantizationType.Q8_0

TEXTS = [
    "hello world",
    "The theory of the thing is that they think three times.",
    "  two  spaces,\ttabs\t\tand\n\nnewlines\n",
    "<start_of_turn>user\nHi there!<end_of_turn>\n<start_of_turn>model\n",
    "digits 0123456789 and 3.14159",
    "café naïve résumé",
    "東京は日本の首都です。",
    "emoji 😀🎉👍🏽 and ZWJ 👨‍👩‍👧",
    "def f(x):\n    return x  # comment\n",
    "<bos> in text, [multimodal], <start_of_image> and <unk>",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "Be brief.  "}, {"role": "user", "content": "  Hello!\n"},
     {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is this? "}]}],
]

# ---------------------------------------------------------------------------------------------------
# A tiny Gemma-like tokenizer: Gemma's special and user-defined pieces (whitespace runs spelled with
# real spaces, as in Gemma's files), 256 byte pieces, then BPE pieces in merge order.

CORPUS = ("The theory of the thing is that they think three times. There is nothing in the world "
          "that a thinker thinks through. Hello world, hello there! In the beginning the earth was "
          "without form. def return import class if else for while print 0123456789 ") * 3


def tiny_tokenizer(size: int = 512) -> Tokenizer:
    head = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<mask>", 3),
            ("[multimodal]", 4), ("<start_of_turn>", 3), ("<end_of_turn>", 3), ("\n", 4),
            ("\n\n", 4), ("  ", 4), ("   ", 4), ("<start_of_image>", 4)]
    pieces = [p for p, _ in head] + [f"<0x{b:02X}>" for b in range(256)]
    types = [t for _, t in head] + [6] * 256
    words = [list(w) for w in CORPUS.replace(" ", " \u2581").split(" ") if w]
    normal = sorted({c for w in words for c in w})
    while len(pieces) + len(normal) < size:  # byte-pair merges, most frequent pair first
        pairs = Counter((a, b) for w in words for a, b in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        normal.append(a + b)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    pieces += normal
    types += [1] * len(normal)
    pieces += [f"<unused{i}>" for i in range(size - len(pieces))]
    types += [3] * (size - len(types))
    return Tokenizer._from_vocab(pieces, types, bos_id=2, eos_id=1, pad_id=0, unk_id=3, source="tiny")


@pytest.fixture(scope="module")
def tiny_tok():
    tok = tiny_tokenizer()
    assert len(tok) == 512 and tok.stop_ids == (1, 7)
    return tok


def tiny_model(name: str, **changes):
    config = get_config(name).replace(**changes)
    return build_model(config, our_state_dict(hf_model(config)), torch.float32, CPU)


def ids_for(tok, n=40):
    """Some text (longer than the tiny window of 8), then random ids up to n."""
    ids = tok.encode("The theory of the thing is hello world " * 3)[:n]
    rest = torch.randint(0, len(tok), (n - len(ids),), generator=torch.Generator().manual_seed(0))
    return ids + rest.tolist()


def logits(model, tok, ids):
    return LM(model, tok).logits(ids)


def gguf_rounded(model, dtype: str):
    """Our model with its weights rounded the way a GGUF of `dtype` stores them."""
    state = {}
    for name, t in model.state_dict().items():
        t = t.float()
        if name.endswith("norm.weight"):
            t = (t + 1.0) - 1.0
        elif t.ndim == 2 and (dtype == "f16" or dtype == "q8_0" and t.shape[-1] % 32):
            t = t.half().float()  # llama.cpp stores rows that are not whole Q8_0 blocks in F16
        elif t.ndim == 2 and dtype == "q8_0":
            t = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), Q8_0), Q8_0))
        state[name] = t
    return build_model(model.config, state, torch.float32, CPU)


def same_config(a, b):
    """Configs equal up to the name and the float32 rounding of rms_norm_eps in GGUF."""
    return a.replace(name="x", rms_norm_eps=1.0) == b.replace(name="x", rms_norm_eps=1.0) and \
        abs(a.rms_norm_eps - b.rms_norm_eps) <= 1e-12


# ---------------------------------------------------------------------------------------------------
# Names

@pytest.mark.parametrize("name", ["tiny", "tiny-gemma2"])
def test_gguf_names_invert_the_reader_table(name):
    with torch.device("meta"):
        model = Gemma3(get_config(name))
    for ours in model.state_dict():
        assert gguf_ckpt.gguf_to_ours(ours_to_gguf(ours)) == ours
    with pytest.raises(ValueError, match="LoRA"):
        ours_to_gguf("layers.0.self_attn.q_proj.lora_A.weight")


# ---------------------------------------------------------------------------------------------------
# Hugging Face export, tiny models

@pytest.mark.parametrize("name", ["tiny-27b-style", "tiny-gemma2"])
def test_hf_export_tiny(tmp_path, tiny_tok, name):
    model = tiny_model(name)
    out = save_hf(model, tiny_tok, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no temporary left behind
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "float32"
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"], gen["bos_token_id"]) == ([1, 7], 0, 2)

    ids = ids_for(tiny_tok)
    ours = logits(model, tiny_tok, ids)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(ref).__name__ == ("Gemma2ForCausalLM" if "gemma2" in name else "Gemma3ForCausalLM")
    with torch.no_grad():
        assert (ref(torch.tensor([ids])).logits[0] - ours).abs().max() <= 1e-4

    back = gemmalab.load(out, mode="fp32")
    assert back.config == model.config.replace(name="out")
    assert torch.equal(back.logits(ids), ours)
    auto = transformers.AutoTokenizer.from_pretrained(out)
    (out / "tokenizer.model").unlink()  # gemmalab reads tokenizer.json too (via `tokenizers`)
    from_json = Tokenizer.from_hf_dir(out)
    for text in TEXTS:
        expected = tiny_tok.encode(text)
        assert back.tokenizer.encode(text) == expected, text
        assert from_json.encode(text) == expected, text
        assert auto(text).input_ids == expected, text
        assert auto.decode(expected) == tiny_tok.decode(expected), text


def test_hf_export_bf16(tmp_path, tiny_tok):
    from safetensors import safe_open

    model = tiny_model("tiny")
    out = save_hf(model, tiny_tok, tmp_path / "bf16", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
    assert keys == {f"model.{k}" for k in model.state_dict()}  # tied: no lm_head
    back = gemmalab.load(out, dtype=torch.bfloat16, mode="fp32")
    for k, v in model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v.bfloat16()), k
    with pytest.raises(ValueError, match="fp32 or bf16"):
        save_hf(model, tiny_tok, tmp_path / "fp16", dtype=torch.float16)


# ---------------------------------------------------------------------------------------------------
# GGUF export, tiny models. GGUF has no key for query_pre_attn_scalar (llama.cpp uses head_dim, or
# d_model / heads for the 27B) and transformers' GGUF reader assumes 256, so the tiny models get
# head_dim = query_pre_attn_scalar = 256.

GGUF_TINY = {"gemma3": "tiny", "gemma3-linear-rope": "tiny-27b-style", "gemma2": "tiny-gemma2"}
LOOSE = {"f32": 0.0, "f16": 1e-2, "q8_0": 1e-1}  # x max|logit|; random tiny models (measured 2e-3, 5e-2)


@pytest.fixture(scope="module")
def gguf_tiny_models():
    return {k: tiny_model(name, head_dim=256, query_pre_attn_scalar=256) for k, name in GGUF_TINY.items()}


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("kind", list(GGUF_TINY))
def test_gguf_export_tiny(tmp_path, tiny_tok, gguf_tiny_models, kind, dtype):
    model = gguf_tiny_models[kind]
    path = save_gguf(model, tiny_tok, tmp_path / "m.gguf", dtype)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    back = gemmalab.load(path, mode="fp32")
    assert same_config(back.config, model.config)
    ids = ids_for(tiny_tok)
    got = back.logits(ids)
    assert torch.equal(got, logits(gguf_rounded(model, dtype), tiny_tok, ids))
    exact = logits(model, tiny_tok, ids)
    assert (got - exact).abs().max() <= LOOSE[dtype] * exact.abs().max()
    for text in TEXTS:
        assert back.tokenizer.encode(text) == tiny_tok.encode(text), text

    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types and types["token_embd.weight"] == dtype.upper()
    assert all(v == "F32" for k, v in types.items() if "norm" in k)
    fields = reader.fields
    assert fields["general.file_type"].contents() == {"f32": 0, "f16": 1, "q8_0": 7}[dtype]
    arch = model.config.family
    assert fields["general.architecture"].contents() == arch
    if kind == "gemma3-linear-rope":
        assert fields[f"{arch}.rope.scaling.type"].contents() == "linear"
        assert fields[f"{arch}.rope.scaling.factor"].contents() == 8.0
    if arch == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"].contents() == 50.0
        assert fields["gemma2.final_logit_softcapping"].contents() == 30.0

    # transformers reads the file: its config from our metadata, except for linear RoPE scaling,
    # which transformers 5.23 does not map for gemma3 GGUFs (its GGUF_CONFIG_MAPPING has no
    # rope.scaling.* for gemma3), so that config is handed over
    config = None
    if kind == "gemma3-linear-rope":
        config = transformers.Gemma3TextConfig(**{
            k: v for k, v in config_to_hf(model.config).items() if k not in ("model_type", "architectures")})
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ref(torch.tensor([ids])).logits[0] - got).abs().max() <= 1e-4


def test_q8_0_falls_back_to_f16_for_rows_that_are_not_blocks(tmp_path, tiny_tok):
    model = tiny_model("tiny", head_dim=256, query_pre_attn_scalar=256, intermediate_size=48)
    path = save_gguf(model, tiny_tok, tmp_path / "m.gguf", "q8_0")
    types = Counter((t.name.split(".")[-2], t.type_name) for t in GGUFFile(path).tensors)
    assert types[("ffn_down", "F16")] == 8 and types[("ffn_up", "Q8_0")] == 8  # rows of 48 vs 64
    ids = ids_for(tiny_tok)
    assert torch.equal(gemmalab.load(path, mode="fp32").logits(ids), logits(gguf_rounded(model, "q8_0"), tiny_tok, ids))


def test_gguf_refuses_what_it_cannot_express(tmp_path, tiny_tok):
    model = tiny_model("tiny")  # query_pre_attn_scalar 256 with head_dim 16
    with pytest.raises(ValueError, match="query_pre_attn_scalar=256"):
        save_gguf(model, tiny_tok, tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="dtype"):
        save_gguf(model, tiny_tok, tmp_path / "m.gguf", "q4_k")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------
# Overwrite refusal and atomicity

def test_refuses_to_overwrite(tmp_path, tiny_tok, gguf_tiny_models):
    model = gguf_tiny_models["gemma3"]
    (tmp_path / "empty").mkdir()
    save_hf(model, tiny_tok, tmp_path / "empty")  # an empty folder is fine
    with pytest.raises(FileExistsError, match="overwrite"):
        save_hf(model, tiny_tok, tmp_path / "empty")
    save_hf(model, tiny_tok, tmp_path / "empty", overwrite=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a model directory"):
        save_hf(model, tiny_tok, tmp_path / "docs", overwrite=True)
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"

    path = save_gguf(model, tiny_tok, tmp_path / "m.gguf", "f32")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_gguf(model, tiny_tok, path, "f16")
    save_gguf(model, tiny_tok, path, "f16", overwrite=True)
    assert GGUFFile(path).get("general.file_type") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "empty", "m.gguf"]


def test_failed_writes_leave_nothing(tmp_path, tiny_tok, gguf_tiny_models, monkeypatch):
    import safetensors.torch

    model = gguf_tiny_models["gemma3"]
    old_dir = save_hf(model, tiny_tok, tmp_path / "hf")
    old_gguf = save_gguf(model, tiny_tok, tmp_path / "m.gguf", "f32")
    old_bytes = old_gguf.read_bytes()

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, tiny_tok, tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, tiny_tok, old_dir, overwrite=True)
    assert gemmalab.load(old_dir, mode="fp32").config == model.config.replace(name="hf")  # the old one is intact

    write_tensor_data = gguf.GGUFWriter.write_tensor_data
    calls = []

    def third_tensor_fails(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) % 3 == 0:
            raise OSError("disk full")
        write_tensor_data(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", third_tensor_fails)
    with pytest.raises(OSError, match="disk full"):
        save_gguf(model, tiny_tok, tmp_path / "new.gguf")
    with pytest.raises(OSError, match="disk full"):
        save_gguf(model, tiny_tok, old_gguf, overwrite=True)
    assert old_gguf.read_bytes() == old_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]


# ---------------------------------------------------------------------------------------------------
# CLI, as a user types it (a tiny GGUF so that it is quick)

def test_cli_export(tmp_path, tiny_tok, gguf_tiny_models):
    from gemmalab.cli import main

    model = gguf_tiny_models["gemma3-linear-rope"]
    src = save_gguf(model, tiny_tok, tmp_path / "tiny.gguf", "f32")
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.run([sys.executable, "-m", "gemmalab", "export", str(src), "--to", "hf",
                           str(tmp_path / "hf"), "--dtype", "fp32"],
                          text=True, capture_output=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {tmp_path / 'hf'} (")
    ids = ids_for(tiny_tok)
    assert torch.equal(gemmalab.load(tmp_path / "hf", mode="fp32").logits(ids), gemmalab.load(src, mode="fp32").logits(ids))

    assert main(["export", str(src), "--to", "gguf", str(tmp_path / "q.gguf"), "--dtype", "q8_0"]) == 0
    assert GGUFFile(tmp_path / "q.gguf").get("general.file_type") == 7


@pytest.mark.parametrize("args, message", [
    (["--to", "hf", "{tmp}/hf", "--dtype", "q8_0"], "not a Hugging Face dtype"),
    (["--to", "gguf", "{tmp}/x.gguf", "--dtype", "bf16"], "not a GGUF dtype"),
    (["--to", "gguf", "{tmp}/exists.gguf"], "exists; pass overwrite=True (CLI: --overwrite)"),
])
def test_cli_export_errors_are_one_line(tmp_path, tiny_tok, gguf_tiny_models, capsys, args, message):
    from gemmalab.cli import main

    src = save_gguf(gguf_tiny_models["gemma3"], tiny_tok, tmp_path / "exists.gguf", "f32")
    assert main(["export", str(src)] + [a.format(tmp=tmp_path) for a in args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gemmalab: error:") and message in err[0], err


# ---------------------------------------------------------------------------------------------------
# The real 270M (embedded Q4_K_M GGUF, loaded in fp32)

PROMPT = "The capital of France is Paris. The capital of Japan is"


@pytest.fixture(scope="module")
def real_hf(lm, tmp_path_factory):
    return save_hf(lm.model, lm.tokenizer, tmp_path_factory.mktemp("real") / "gemma-3-270m")


@pytest.fixture(scope="module")
def real_gguf(lm, tmp_path_factory):
    return save_gguf(lm.model, lm.tokenizer, tmp_path_factory.mktemp("real") / "gemma-3-270m-f16.gguf",
                     "f16")


@pytest.mark.slow
def test_real_hf_export(lm, real_hf):
    ids = lm.tokenizer.encode(PROMPT)
    ours = lm.logits(ids)
    ref = transformers.Gemma3ForCausalLM.from_pretrained(real_hf).eval()
    with torch.no_grad():
        assert (ref(torch.tensor([ids])).logits[0] - ours).abs().max() <= 1e-4
    back = gemmalab.load(real_hf, mode="fp32")
    assert back.config == lm.config.replace(name=real_hf.name)
    assert torch.equal(back.logits(ids), ours)
    for text in TEXTS:
        assert back.tokenizer.encode(text) == lm.tokenizer.encode(text), text
    # tokenizer.model is a plain SentencePiece model: SentencePiece itself agrees on text without
    # special tokens (it matches user-defined pieces like "\n" itself, never control ones)
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(real_hf / "tokenizer.model"))
    for text in TEXTS:
        if "<" not in text:
            assert sp.encode(text) == lm.tokenizer.encode(text, add_bos=False), text


@pytest.mark.slow
def test_real_hf_tokenizer_and_chat_template(lm, real_hf):
    auto = transformers.AutoTokenizer.from_pretrained(real_hf)
    assert auto.chat_template == CHAT_TEMPLATE
    for text in TEXTS:
        expected = lm.tokenizer.encode(text)
        assert auto(text).input_ids == expected, text
        assert auto.decode(expected) == lm.tokenizer.decode(expected), text
        assert auto.decode(expected, skip_special_tokens=True) == \
            lm.tokenizer.decode(expected, skip_special=True), text
    for messages in CONVERSATIONS:
        rendered = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == lm.tokenizer.apply_chat_template(messages)
        assert auto(rendered, add_special_tokens=False).input_ids == lm.tokenizer.encode_chat(messages)


@pytest.mark.slow
def test_real_gguf_export(lm, model_path, real_gguf):
    back = gemmalab.load(real_gguf, mode="fp32")
    assert same_config(back.config, lm.config)
    ids = lm.tokenizer.encode(PROMPT)
    got = back.logits(ids)
    assert torch.equal(got, logits(gguf_rounded(lm.model, "f16"), lm.tokenizer, ids))
    exact = lm.logits(ids)
    assert (got - exact).abs().max() <= 2e-3 * exact.abs().max()
    for text in TEXTS:
        assert back.tokenizer.encode(text) == lm.tokenizer.encode(text), text

    # gguf's own reader on the export; our parser on the original (GGUFReader takes ~15 s per
    # 262k-token file). Same keys but the general.* extras; one addition: the chat template.
    original = GGUFFile(model_path)
    exported = gguf.GGUFReader(real_gguf)
    keys = {k for k in exported.fields if not k.startswith("GGUF.")}
    specific = lambda ks: {k for k in ks if not k.startswith("general.")}  # noqa: E731
    assert specific(keys) - specific(original.metadata) == {"tokenizer.chat_template"}
    assert specific(original.metadata) <= keys
    for key in specific(original.metadata) - {"tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                              "tokenizer.ggml.token_type"}:
        want = original.get(key)
        assert exported.fields[key].contents() == pytest.approx(want), key
    assert exported.fields["tokenizer.ggml.tokens"].contents() == original.get("tokenizer.ggml.tokens")
    assert exported.fields["tokenizer.ggml.token_type"].contents() == \
        original.get("tokenizer.ggml.token_type").tolist()
    scores = np.asarray(exported.fields["tokenizer.ggml.scores"].contents(), np.float32)
    want = original.get("tokenizer.ggml.scores")
    assert np.array_equal(scores[:236743], want[:236743])
    normal = original.get("tokenizer.ggml.token_type") == 1
    assert np.all(np.diff(scores[normal]) < 0) and np.array_equal(scores[~normal], want[~normal])
    assert sorted(t.name for t in exported.tensors) == sorted(t.name for t in original.tensors)
    assert {t.name: tuple(int(n) for n in t.shape) for t in exported.tensors} == \
        {t.name: t.ne for t in original.tensors}

    # transformers reading the export. The config is passed in so that transformers parses the
    # 262k-token metadata once instead of twice (~25 s); the tiny GGUF tests cover its config path.
    config = transformers.Gemma3TextConfig(**{
        k: v for k, v in config_to_hf(lm.config).items() if k not in ("model_type", "architectures")})
    ref = transformers.Gemma3ForCausalLM.from_pretrained(
        str(real_gguf.parent), gguf_file=real_gguf.name, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ref(torch.tensor([ids])).logits[0] - got).abs().max() <= 1e-4
