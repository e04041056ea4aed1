"""transformers reference models for tiny configs, built from our config."""
import torch
import transformers

from gemmalab.checkpoints.hf import config_to_hf


def hf_model(config, seed: int = 0):
    """A transformers Gemma3ForCausalLM / Gemma2ForCausalLM with random weights (norms too)."""
    d = config_to_hf(config)
    model_type = d.pop("model_type")
    d.pop("architectures")
    torch.manual_seed(seed)
    if model_type == "gemma2":
        ref = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**d))
    else:
        ref = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**d))
    with torch.no_grad():  # norm weights start at 0; randomise them so (1 + w) is really tested
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return ref.eval()


def our_state_dict(ref) -> dict:
    return {k[len("model."):]: v for k, v in ref.state_dict().items() if k.startswith("model.")}
