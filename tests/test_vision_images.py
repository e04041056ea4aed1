"""Image preprocessing against transformers' Gemma3ImageProcessor (the PIL backend of the hub
preprocessor_config.json) on real PNG/JPEG files made here, Pan & Scan, and bad images."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from gemmalab.images import (MAX_PIXELS, ImageError, PanAndScan, expand_image_markers, load_image,
                             pan_and_scan_boxes, preprocess)

from .vision_reference import hf_image_processor

PAS = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4,
           pan_and_scan_min_ratio_to_activate=1.2)  # Gemma3Processor's defaults (spec 3.5)


def picture(width, height, mode="RGB", seed=0):
    """A photo-like test image: smooth gradients plus noise and sharp edges (so resampling shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                    127 + 127 * np.sin((x + 2 * y) / 9.0)], -1)
    rgb += rng.normal(0, 20, rgb.shape)
    rgb[(x // 37 + y // 23) % 5 == 0] = 255
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        img.putalpha(alpha)
    elif mode == "P+transparency":
        img = img.convert("P", palette=Image.ADAPTIVE, colors=64)
        img.info["transparency"] = 3
    elif mode != "RGB":
        img = img.convert(mode)
    return img


# (width, height, mode, format): landscape, portrait, square, extreme, tiny, and colour modes
FILES = [
    (640, 480, "RGB", "JPEG"), (1000, 300, "RGB", "PNG"), (300, 1100, "RGB", "JPEG"),
    (896, 896, "RGB", "PNG"), (2000, 260, "RGB", "PNG"), (500, 400, "L", "PNG"),
    (700, 320, "RGBA", "PNG"), (600, 250, "CMYK", "JPEG"), (333, 777, "P+transparency", "PNG"),
    (450, 1200, "LA", "PNG"), (37, 91, "RGB", "PNG"), (1, 1, "RGB", "PNG"), (1200, 900, "I;16", "PNG"),
]


@pytest.fixture(scope="module")
def reference():
    return hf_image_processor(896)


@pytest.mark.parametrize("width,height,mode,fmt", FILES)
def test_pixels_match_gemma3_image_processor(tmp_path, reference, width, height, mode, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    image = picture(width, height, mode)
    image.save(path, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    for pan_and_scan in (False, True):
        ours, crops = preprocess([path], 896, pan_and_scan)
        kwargs = PAS if pan_and_scan else {}
        expected = reference(Image.open(path), return_tensors="pt", **kwargs)
        want = expected["pixel_values"]
        assert crops == expected["num_crops"].tolist() if pan_and_scan else crops == [0]
        assert ours.shape == want.shape == (1 + crops[0], 3, 896, 896)
        assert ours.dtype == torch.float32
        diff = (ours - want).abs().max().item()
        print(f"\n[{width}x{height} {mode} {fmt}, pan&scan {pan_and_scan}: {crops[0]} crops] "
              f"max |ours - transformers| = {diff:.1e}")
        assert diff <= 1e-5
        assert ours.min() >= -1 and ours.max() <= 1
    # the same image as a PIL object and as a uint8 array: the same pixels
    if mode == "RGB":
        assert torch.equal(preprocess([Image.open(path)])[0], preprocess([path])[0])
        array = np.asarray(Image.open(path))
        assert (preprocess([array])[0] - reference(array, return_tensors="pt")["pixel_values"]
                ).abs().max() <= 1e-5


def test_pan_and_scan_crop_counts_for_many_sizes(reference):
    """Our crop boxes against transformers' pan_and_scan on arrays (no resizing), 400 sizes."""
    rng = np.random.default_rng(1)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 3000, (400, 2))]
    sizes += [(300, 250), (307, 256), (512, 256), (1280, 256), (256, 1024), (2560, 512)]
    activated = 0
    for w, h in sizes:
        array = np.zeros((3, h, w), np.uint8)
        want = reference.pan_and_scan(array, 256, 4, 1.2)
        boxes = pan_and_scan_boxes(w, h)
        assert len(boxes) == len(want), (w, h)
        for (left, top, right, bottom), crop in zip(boxes, want):
            assert crop.shape[1:] == (bottom - top, right - left), (w, h)
        activated += bool(boxes)
    assert activated > 100  # the sizes exercise the crops, not only the no-crop path
    assert len(pan_and_scan_boxes(1280, 256)) == 4 and len(pan_and_scan_boxes(512, 256)) == 2
    assert pan_and_scan_boxes(1000, 900) == []  # ratio below 1.2
    assert pan_and_scan_boxes(300, 250) == []  # crops would be narrower than 256 px
    assert pan_and_scan_boxes(300, 250, PanAndScan(min_crop_size=100)) == [(0, 0, 150, 250),
                                                                            (150, 0, 300, 250)]


def test_prompt_wording_for_crops():
    text = expand_image_markers("A <start_of_image> B <start_of_image>", [0, 2])
    block = "\n\n<start_of_image><end_of_image>\n\n"
    assert text == ("A " + block + " B Here is the original image " + block +
                    " and here are some crops to help you see better " + block + " " + block)
    with pytest.raises(ValueError, match="1 <start_of_image> markers for 2 images"):
        expand_image_markers("<start_of_image>", [0, 0])


def test_modes_are_converted_like_transformers():
    """Grayscale repeats the channel; RGBA is composited onto white; CMYK goes through Pillow."""
    gray = Image.fromarray(np.full((8, 8), 100, np.uint8))
    assert load_image(gray).getpixel((0, 0)) == (100, 100, 100)
    rgba = Image.fromarray(np.array([[[200, 0, 0, 0], [200, 0, 0, 255]]], np.uint8))
    rgb = load_image(rgba)
    assert (rgb.getpixel((0, 0)), rgb.getpixel((1, 0))) == ((255, 255, 255), (200, 0, 0))
    assert load_image(np.zeros((4, 4, 4), np.uint8)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.ones((3, 5, 1))).getpixel((0, 0)) == (255, 255, 255)  # float [0, 1]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 0, 0))
    assert load_image(cmyk).getpixel((0, 0)) == (255, 0, 255)


# ---- bad images -----------------------------------------------------------------------------

def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_files_get_clear_errors(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageError, match="no such image file"):
        load_image(missing)
    with pytest.raises(ImageError, match="is not a file"):
        load_image(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("just some text")
    with pytest.raises(ImageError, match="not an image format Pillow can read"):
        load_image(text)
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n")
    with pytest.raises(ImageError, match="not an image format Pillow can read"):
        load_image(pdf)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError, match="not an image format"):
        load_image(garbage)
    data = png_bytes(picture(300, 200))
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(cut)
    buf = io.BytesIO()
    picture(300, 200).save(buf, format="JPEG")
    cut_jpeg = tmp_path / "cut.jpg"
    cut_jpeg.write_bytes(buf.getvalue()[:1500])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(cut_jpeg)
    with pytest.raises(ImageError, match="cut.png is corrupt"):  # a path names itself
        preprocess([picture(10, 10), cut])
    with pytest.raises(ImageError, match="image 1: an array must be"):  # others by position
        preprocess([picture(10, 10), np.zeros((2, 2, 2), np.uint8)])


def test_very_large_images_are_refused_before_decoding(tmp_path):
    """A 20,000 x 10,000 PNG (1-bit, a few KB on disk): over MAX_PIXELS, refused from the header."""
    side = (20_000, 10_000)
    assert side[0] * side[1] > MAX_PIXELS
    big = tmp_path / "big.png"
    Image.new("1", side).save(big)
    assert big.stat().st_size < 1_000_000
    with pytest.raises(ImageError, match="too large"):
        load_image(big)
    with pytest.raises(ImageError, match="too large"):
        load_image(Image.new("1", side))
    # large but allowed: 4000 x 3000 is decoded and downscaled
    ok = tmp_path / "ok.jpg"
    picture(4000, 3000).save(ok, quality=80)
    pixels, crops = preprocess([ok], 896, True)
    assert pixels.shape == (3, 3, 896, 896) and crops == [2]


@pytest.mark.parametrize("array,message", [
    (np.zeros((0, 5, 3), np.uint8), "empty"),
    (np.zeros((3, 64, 64), np.uint8), "channels first"),
    (np.zeros((4, 4, 2), np.uint8), r"must be \(H, W\)"),
    (np.zeros((4, 4, 3), np.int64), "must be uint8"),
    (np.full((4, 4, 3), 2.0), r"values in \[0, 1\]"),
    (np.full((4, 4), np.nan), r"values in \[0, 1\]"),
])
def test_bad_arrays_get_clear_errors(array, message):
    with pytest.raises(ImageError, match=message):
        load_image(array)


def test_other_inputs_get_clear_errors():
    with pytest.raises(ImageError, match="expected a file path, a PIL image or a numpy array"):
        load_image(12)
    with pytest.raises(ImageError, match="empty"):
        load_image(Image.new("RGB", (0, 3)))
    assert math.isclose(float(preprocess([np.zeros((1, 1, 3), np.uint8)])[0].mean()), -1.0)
