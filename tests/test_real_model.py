"""The embedded Gemma 3 270M: parity with transformers loading the same GGUF, and the public API."""
import pytest
import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a village at the edge of the forest,",
    "東京は日本の首都で、",
    "Question: What is 12 times 7?\nAnswer:",
    "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n",
]


@pytest.fixture(scope="module")
def hf(model_path):
    """transformers' Gemma3ForCausalLM dequantizing the same GGUF (slow: ~40-60 s here)."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
    return model.eval()


@pytest.mark.slow
def test_logits_match_transformers(lm, hf):
    for prompt in PROMPTS:
        ids = lm.tokenizer.encode(prompt)
        ours = lm.logits(ids)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        assert ours.shape == (len(ids), 262144)
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-3, (prompt, diff)


@pytest.mark.slow
def test_greedy_continuations_match_transformers(lm, hf):
    for prompt in PROMPTS[:5]:
        ids = lm.tokenizer.encode(prompt)
        ours = lm.generate(ids, max_new_tokens=32, temperature=0)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                              eos_token_id=[1, 106], pad_token_id=0)
        assert ours.token_ids == out[0, len(ids):].tolist(), prompt


@pytest.mark.slow
def test_batched_generation_equals_one_at_a_time(lm):
    prompts = PROMPTS[:4]
    batch = lm.generate(prompts, max_new_tokens=24, temperature=0)
    for prompt, result in zip(prompts, batch):
        single = lm.generate(prompt, max_new_tokens=24, temperature=0)
        assert result.token_ids == single.token_ids
        assert result.text == single.text


@pytest.mark.slow
def test_api_shapes_text_and_streaming(lm):
    result = lm.generate("The capital of France is", max_new_tokens=12, temperature=0)
    assert "France" in result.text  # base model: " the capital of the country of France. ..."
    assert result.finish_reason in ("stop", "length") and 0 < len(result.token_ids) <= 12
    kept = [t for t in result.token_ids if t not in lm.tokenizer.stop_ids]
    assert lm.tokenizer.decode(kept) == result.text
    streamed = "".join(lm.stream("The capital of France is", max_new_tokens=12, temperature=0))
    assert streamed == result.text
    # a stop string cuts the text where it first appears
    cut = lm.generate("The capital of France is", max_new_tokens=12, temperature=0, stop=["France"])
    assert cut.finish_reason == "stop" and "France" not in cut.text
    assert result.text.startswith(cut.text)
    # seeded sampling is reproducible
    a = lm.generate("Tell me a story:", max_new_tokens=16, temperature=1.0, seed=5)
    b = lm.generate("Tell me a story:", max_new_tokens=16, temperature=1.0, seed=5)
    assert a.token_ids == b.token_ids


def test_prompt_longer_than_context_is_refused(lm):
    from gemmalab import PromptTooLongError
    with pytest.raises(PromptTooLongError, match="32768"):
        lm.generate([2] + [236743] * 32768, max_new_tokens=4)


def test_chat_uses_the_template(lm):
    ids = lm.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[:2] == [2, 105] and ids.count(2) == 1 and ids[-3:] == lm.tokenizer.encode(
        "<start_of_turn>model\n", add_bos=False)
    reply = lm.chat([{"role": "user", "content": "Say hello."}], max_new_tokens=8, temperature=0)
    assert isinstance(reply.text, str) and reply.token_ids
