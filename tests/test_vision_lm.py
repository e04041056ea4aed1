"""Images through the public API and the CLI, against transformers end to end: a tiny random
Gemma3ForConditionalGeneration with the real 262,208-row vocabulary, saved with save_pretrained next to
the real Gemma 3 tokenizer, loaded by `gemmalab.load`; inputs made by transformers' Gemma3Processor
from the same image files."""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import gemmalab
from gemmalab.config import get_multimodal_config
from gemmalab.generate import PromptTooLongError

from .test_cli import gemmalab as run_cli
from .test_cli import one_clear_line
from .vision_reference import hf_multimodal, hf_processor, write_gemma3_tokenizer

MM = get_multimodal_config("tiny-vision-262k")  # 64 px images, 16 soft tokens, context 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model_path):
    folder = tmp_path_factory.mktemp("gemma3-tiny-vision")
    hf_multimodal(MM, seed=0).save_pretrained(folder)
    write_gemma3_tokenizer(folder, model_path)
    return folder


@pytest.fixture(scope="module")
def ref(model_dir):
    return transformers.Gemma3ForConditionalGeneration.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def processor(model_dir):
    return hf_processor(model_dir, MM)


@pytest.fixture(scope="module")
def vlm(model_dir):
    return gemmalab.load(model_dir)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Real image files: a wide PNG and a tall JPEG (both big enough for Pan & Scan's 256 px crops)
    and a small square PNG."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:300, 0:900]
    wide = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    wide[::7] = rng.integers(0, 256, wide[::7].shape, dtype=np.uint8)
    tall = rng.integers(0, 256, (700, 280, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    paths = [folder / "wide.png", folder / "tall.jpg", folder / "small.png"]
    for path, a in zip(paths, (wide, tall, small)):
        Image.fromarray(a).save(path, quality=90) if path.suffix == ".jpg" else Image.fromarray(a).save(path)
    return paths


CASES = [("A picture of a test pattern: stripes, noise and a gradient, described in words.", 0), ("Look: <start_of_image> what is it?\n", 1),
         ("First<start_of_image>\nthen <start_of_image>compare.", 2)]


def reference_inputs(processor, text, paths, pan_and_scan):
    images = [Image.open(p) for p in paths] or None
    return processor(text=text, images=images, return_tensors="pt", do_pan_and_scan=pan_and_scan)


@pytest.mark.parametrize("pan_and_scan", [False, True])
@pytest.mark.parametrize("text,n_images", CASES)
def test_logits_match_transformers(vlm, ref, processor, image_files, text, n_images, pan_and_scan):
    paths = image_files[:n_images]
    inputs = reference_inputs(processor, text, paths, pan_and_scan)
    ids, _ = vlm._with_images([text], [paths] if paths else None, pan_and_scan)
    assert ids[0] == inputs["input_ids"][0].tolist()  # the processor's layout, token for token
    crops = sum([3, 2][:n_images]) if pan_and_scan else 0  # Pan & Scan: wide 3 crops, tall 2
    assert ids[0].count(MM.boi_token_id) == n_images + crops
    assert len(ids[0]) > MM.text.sliding_window
    with torch.no_grad():
        expected = ref(input_ids=inputs["input_ids"], pixel_values=inputs.get("pixel_values"),
                       token_type_ids=inputs["token_type_ids"]).logits[0]
    got = vlm.logits(text, images=paths or None, pan_and_scan=pan_and_scan)
    diff = (got - expected).abs().max().item()
    print(f"\n[{n_images} images, pan&scan {pan_and_scan}, {len(ids[0])} tokens] "
          f"max |ours - transformers| = {diff:.2e}")
    assert diff <= 1e-4


def test_chat_matches_the_processor_chat_template(vlm, ref, processor, image_files):
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "image", "image": str(image_files[0])},
                                             {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "A test pattern."},
                {"role": "user", "content": [{"type": "text", "text": "And this one?"},
                                             {"type": "image", "image": str(image_files[2])}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    ids, _ = vlm._with_images([vlm.chat_prompt(messages)], [[str(p) for p in image_files[::2]]],
                              False)
    assert ids[0] == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=[1, 106])
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    got = vlm.chat(messages, max_new_tokens=8, temperature=0)
    assert got.token_ids == expected  # cached greedy decoding after two images, as transformers


def test_greedy_generation_matches_transformers(vlm, ref, processor, image_files):
    text = "Compare <start_of_image> and <start_of_image>:"
    inputs = reference_inputs(processor, text, image_files[:2], True)
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=[1, 106])
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    got = vlm.generate(text, 12, temperature=0, images=image_files[:2], pan_and_scan=True)
    assert got.token_ids == expected
    assert got.prompt_tokens == inputs["input_ids"].shape[1]
    streamed = "".join(vlm.stream(text, 12, temperature=0, images=image_files[:2],
                                  pan_and_scan=True))
    assert streamed == got.text


def test_image_forms_and_batches(vlm, image_files):
    path = image_files[2]
    pil = Image.open(path)
    array = np.asarray(pil.convert("RGB"))
    first = vlm.generate("Describe", 6, temperature=0, images=[str(path)])
    assert vlm.generate("Describe", 6, temperature=0, images=path).token_ids == first.token_ids
    assert vlm.generate("Describe", 6, temperature=0, images=pil).token_ids == first.token_ids
    assert vlm.generate("Describe", 6, temperature=0, images=array).token_ids == first.token_ids
    # images without a marker go first: the same as a marker at the start
    assert vlm.generate("<start_of_image>Describe", 6, temperature=0,
                        images=[path]).token_ids == first.token_ids
    ids = vlm.tokenizer.encode("<start_of_image>Describe")  # an ids prompt with the marker id
    assert vlm.generate(ids, 6, temperature=0, images=[path]).token_ids == first.token_ids
    # a left-padded batch: rows with two images, none, one
    prompts = ["Two: <start_of_image> <start_of_image>", "No image here, just text", "Describe"]
    images = [[image_files[0], image_files[1]], [], [path]]
    batch = vlm.generate(prompts, 6, temperature=0, images=images)
    for prompt, imgs, result in zip(prompts, images, batch):
        alone = vlm.generate(prompt, 6, temperature=0, images=imgs or None)
        assert result.token_ids == alone.token_ids
    assert batch[2].token_ids == first.token_ids


def test_prompt_and_image_mismatches_are_clear(vlm, image_files):
    with pytest.raises(ValueError, match="2 <start_of_image> markers for 1 images"):
        vlm.generate("<start_of_image> and <start_of_image>", 2, images=[image_files[0]])
    with pytest.raises(ValueError, match="markers but no images were given"):
        vlm.generate("<start_of_image> what?", 2)
    with pytest.raises(ValueError, match="one list per prompt"):
        vlm.generate(["a", "b"], 2, images=[image_files[0]])
    with pytest.raises(ValueError, match="already holds image soft tokens"):
        vlm.generate("<image_soft_token>", 2, images=[image_files[0]])
    with pytest.raises(ValueError, match="has no image"):
        vlm.chat([{"role": "user", "content": [{"type": "image"}]}], 2)
    with pytest.raises(ValueError, match="URLs are not fetched"):
        vlm.chat([{"role": "user", "content": [{"type": "image", "url": "https://x/y.png"}]}], 2)
    with pytest.raises(ValueError, match="not used"):
        vlm.chat([{"role": "user", "content": "hi"}], 2, images=[image_files[0]])


def test_images_that_overflow_the_context_are_refused(vlm, image_files):
    n = 30  # 30 x 20 tokens > 512 (adjacent images share a "\n\n\n\n" token: 19 each)
    with pytest.raises(PromptTooLongError, match=f"for {n} image.*the model context is 512"):
        vlm.generate("<start_of_image>" * n, 4, images=[image_files[2]] * n)


def test_text_only_model_refuses_images(lm, image_files):
    with pytest.raises(ValueError, match="text-only model and cannot take images"):
        lm.generate("Describe", 4, images=[image_files[2]])
    with pytest.raises(ValueError, match="text-only model and cannot take images"):
        lm.chat([{"role": "user", "content": [{"type": "image", "image": str(image_files[2])}]}])


# ---- the CLI ----------------------------------------------------------------------------------

def test_cli_info_shows_the_vision_encoder(model_dir, capsys):
    from gemmalab.cli import main

    assert main(["info", "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "vocab 262208" in out
    assert ("vision     SigLIP 2 layers, width 32, 64 px in 4 px patches, 16 tokens per image; "
            f"{MM.vision.num_parameters:,} + projector {MM.projector_parameters:,} parameters") in out


@pytest.mark.slow
def test_cli_generate_with_images(vlm, model_dir, image_files):
    proc = run_cli("generate", "--model", str(model_dir), "--image", str(image_files[0]),
                   "-i", str(image_files[1]), "--pan-and-scan", "-n", "6", "-t", "0",
                   "Compare <start_of_image> and <start_of_image>:")
    assert proc.returncode == 0, proc.stderr
    expected = vlm.generate("Compare <start_of_image> and <start_of_image>:", 6, temperature=0,
                            images=image_files[:2], pan_and_scan=True).text
    assert proc.stdout == expected + "\n"
    chat = run_cli("generate", "--model", str(model_dir), "--image", str(image_files[2]), "--chat",
                   "-n", "5", "-t", "0", "What is this?")
    assert chat.returncode == 0, chat.stderr
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image_files[2])},
                                             {"type": "text", "text": "What is this?"}]}]
    assert chat.stdout == vlm.chat(messages, 5, temperature=0).text + "\n"


@pytest.mark.slow
def test_cli_chat_with_images(vlm, model_dir, image_files):
    proc = run_cli("chat", "--model", str(model_dir), "--image", str(image_files[0]), "-n", "4",
                   "-t", "0", stdin=f"Hello\n/image {image_files[2]}\nAnd this?\n/image nope.png\n")
    assert proc.returncode == 0, proc.stderr
    first = [{"role": "user", "content": [{"type": "image", "image": str(image_files[0])},
                                          {"type": "text", "text": "Hello"}]}]
    reply = vlm.chat(first, 4, temperature=0).text
    second = first + [{"role": "assistant", "content": reply},
                      {"role": "user", "content": [{"type": "image", "image": str(image_files[2])},
                                                   {"type": "text", "text": "And this?"}]}]
    lines = proc.stdout.splitlines()
    assert lines[0] == reply
    assert lines[1] == f"(image {image_files[2]} goes with your next message)"
    assert lines[2] == vlm.chat(second, 4, temperature=0).text
    assert "gemmalab: error: no such image file: nope.png" in proc.stderr


@pytest.mark.slow
def test_cli_image_errors_are_one_clear_line(model_dir, image_files, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    one_clear_line(run_cli("generate", "--model", str(model_dir), "--image", str(not_image), "x"),
                   "not an image format Pillow can read")
    one_clear_line(run_cli("generate", "--image", str(image_files[2]), "-n", "2", "x"),
                   "text-only model and cannot take images")
    one_clear_line(run_cli("chat", "--image", str(image_files[2]), stdin="hi\n"),
                   "text-only model and cannot take images")
    many = ["--image", str(image_files[2])] * 30
    one_clear_line(run_cli("generate", "--model", str(model_dir), *many, "-n", "2", "x"),
                   "the model context is 512 tokens")
