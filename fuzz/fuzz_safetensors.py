"""Fuzz the weights of a Hugging Face directory: safetensors headers and data, and sharded indexes.

An input is one directory next to a fixed valid config.json (a 1-layer, 8-wide Gemma 3):
- first byte even: the rest is model.safetensors;
- first byte odd: the rest, split at SEP, is model.safetensors.index.json followed by up to four
  shards, written as model-0000{1..4}-of-00002.safetensors.
Each directory goes through tensor_dtypes (headers only, what `gemmalab info` shows) and
read_hf_dir(vision=True) then build_model, which is what gemmalab.load does with it (the tokenizer
files have their own harness).

Seeds: the micro model's tensors under the names gemmalab.checkpoints.export's save_hf writes
(`model.`-prefixed, as transformers' save_pretrained writes Gemma3ForCausalLM), fp32 and bf16, a
two-shard split with its index, and files with one small tensor of every dtype, a 0-d and an empty
tensor.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Target, check_outcome, instrumented, main, write  # noqa: E402

with instrumented():
    from gemmalab.checkpoints.errors import CheckpointError
    from gemmalab.checkpoints.export import _hf_tensors
    from gemmalab.checkpoints.hf import config_to_hf, read_hf_dir, tensor_dtypes
    from gemmalab.config import SLIDING, Gemma3Config
    from gemmalab.lm import build_model
    from gemmalab.model import Gemma3

import torch  # noqa: E402
from safetensors.torch import save  # noqa: E402

SEP = b"\n##shard##\n"
SHARDS = [f"model-{i:05d}-of-00002.safetensors" for i in range(1, 5)]
MICRO = Gemma3Config(name="micro", vocab_size=16, hidden_size=8, num_hidden_layers=1,
                     num_attention_heads=1, num_key_value_heads=1, head_dim=8, intermediate_size=8,
                     layer_types=(SLIDING,), sliding_window=4, query_pre_attn_scalar=8,
                     max_position_embeddings=32)


def setup(scratch: Path) -> None:
    write(scratch, "config.json", json.dumps(config_to_hf(MICRO)).encode())


def one(data: bytes, scratch: Path) -> None:
    for name in ["model.safetensors", "model.safetensors.index.json", *SHARDS]:
        (scratch / name).unlink(missing_ok=True)
    if not data or data[0] % 2 == 0:
        write(scratch, "model.safetensors", data[1:])
    else:
        index, *shards = data[1:].split(SEP)
        write(scratch, "model.safetensors.index.json", index)
        for name, shard in zip(SHARDS, shards):
            write(scratch, name, shard)
    try:
        tensor_dtypes(scratch)
    except CheckpointError as e:
        check_outcome(TARGET, e)  # a Finding unless the message is one line
    config, tensors = read_hf_dir(scratch, vision=True)
    build_model(config, tensors, torch.float32, torch.device("cpu"), source=scratch)


def _micro_tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Gemma3(MICRO)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return _hf_tensors(model, dtype)


def seeds(d: Path) -> list[bytes]:
    fp32 = _micro_tensors(torch.float32)
    out = [b"\0" + save(fp32, metadata={"format": "pt"}),
           b"\0" + save(_micro_tensors(torch.bfloat16), metadata={"format": "pt"})]
    names = sorted(fp32)
    half = len(names) // 2
    parts = [{k: fp32[k] for k in names[:half]}, {k: fp32[k] for k in names[half:]}]
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in fp32.values())},
             "weight_map": {k: SHARDS[i] for i, p in enumerate(parts) for k in p}}
    out.append(b"\1" + SEP.join([json.dumps(index).encode()] + [save(p) for p in parts]))
    dtypes = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
              torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn,
              torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64]
    small = {f"model.layers.0.t{i}": torch.ones(2, 3).to(t) for i, t in enumerate(dtypes)}
    small["model.norm.weight"] = torch.tensor(1.5)  # 0-d
    small["model.empty"] = torch.zeros(0, 4)
    out.append(b"\0" + save(small, metadata={"k": "v"}))
    return out


TARGET = Target("safetensors", one, (CheckpointError,), seeds, setup=setup,
                notes="a directory with a fuzzed model.safetensors or index.json + shards -> "
                      "tensor_dtypes, read_hf_dir(vision=True), build_model (what gemmalab.load does)")

if __name__ == "__main__":
    main(TARGET)
