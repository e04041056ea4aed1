"""LoRA fine-tuning of the real embedded 270M on CPU: the loss falls; merging keeps the logits."""
import json

import pytest
from safetensors.torch import load_file

import gemmalab
from gemmalab.train.config import build_config
from gemmalab.train.lora import apply_lora, merge_lora
from gemmalab.train.recipes.sft import train_sft

FACTS = [("What colour is the sky on Zorblax?", "The sky on Zorblax is bright green."),
         ("Who built the tower of Quell?", "The tower of Quell was built by the weaver Ambri."),
         ("How many moons does Zorblax have?", "Zorblax has seven small moons."),
         ("What do people on Quell eat?", "People on Quell eat blue rice and roasted figs.")]


@pytest.mark.slow
def test_lora_on_the_real_270m_lowers_loss_and_merges(tmp_path):
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in FACTS * 4))
    out = tmp_path / "run"
    cfg = build_config({"data": {"train": [str(data)], "seq_len": 64, "batch_size": 2},
                        "optim": {"lr": 2e-3, "grad_clip": 1.0},
                        "lora": {"rank": 8, "alpha": 16},
                        "run": {"out_dir": str(out), "steps": 8, "log_every": 1, "save_every": 8,
                                "seed": 0}})
    train_sft(cfg, progress=False)
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses

    adapter = load_file(str(out / "checkpoints" / "step-000008" / "model.safetensors"))
    assert adapter and all(".lora_" in k for k in adapter)
    lm = gemmalab.load(mode="fp32")
    base = lm.logits(lm.tokenizer.encode_chat([{"role": "user", "content": FACTS[0][0]}]))
    apply_lora(lm.model, 8, 16, cfg.lora.targets)
    lm.model.load_state_dict(adapter, strict=False)
    ids = lm.tokenizer.encode_chat([{"role": "user", "content": FACTS[0][0]}])
    with_adapter = lm.logits(ids)
    merge_lora(lm.model)
    assert not any("lora" in k for k in lm.model.state_dict())
    merged = lm.logits(ids)
    assert (merged - with_adapter).abs().max() <= 1e-3
    assert (with_adapter - base).abs().max() > 0.1  # the adapter really changed the model
    from gemmalab.checkpoints.export import save_hf
    save_hf(lm.model, lm.tokenizer, tmp_path / "merged")  # the exported merged model
    exported = gemmalab.load(tmp_path / "merged", mode="fp32").logits(ids)
    assert (exported - with_adapter).abs().max() <= 1e-3
