"""The image loader under fuzzing: the CI-sized run of fuzz/fuzz_image.py and each reproducer it
found, as a regression test: documented ImageError, one line, naming the file."""
import base64
import io
import os
import warnings

import pytest
from PIL import Image

from gemmalab.images import MAX_PIXELS, ImageError, load_image, preprocess

from .fuzz_helpers import run_fuzz


def test_fuzz_image(tmp_path):
    stats = run_fuzz("image", tmp_path, runs=2000, seconds=45)
    assert set(stats["outcomes"]) <= {"ok", "ImageError"}


def refused(image, match: str) -> str:
    with pytest.raises(ImageError, match=match) as e:
        load_image(image)
    msg = str(e.value)
    assert msg.strip() and "\n" not in msg, msg
    return msg


# The fuzzer's finding (one bit flipped in the 8 x 6 1-bit PNG seed): the IHDR chunk length 13 -> 9.
# Pillow's PNG plugin raised ValueError("Truncated IHDR chunk") out of Image.open, which load_image
# let through (it caught OSError only).
TRUNCATED_IHDR = base64.b64decode("iVBORw0KGgoAAAAJSUhEUgAAAAgAAAAGAQAAAADWfuJWAAAAFElEQVR4nGOoYhJCYII=")


def test_truncated_ihdr_is_an_image_error(tmp_path):
    path = tmp_path / "ihdr.png"
    path.write_bytes(TRUNCATED_IHDR)
    assert "ihdr.png is corrupt" in refused(path, "Truncated IHDR chunk")
    with pytest.raises(ImageError, match="ihdr.png"):
        preprocess([path], pan_and_scan=True)


def test_decompression_bomb_warning_as_error_is_an_image_error(tmp_path):
    """Between Pillow's warning (89M pixels) and MAX_PIXELS images load; under `-W error` Pillow's
    DecompressionBombWarning is raised from Image.open: refused as too large, not let through."""
    side = (10_000, 10_000)
    assert Image.MAX_IMAGE_PIXELS < side[0] * side[1] <= MAX_PIXELS
    path = tmp_path / "bomb.png"
    Image.new("1", side).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        refused(path, "too large to decode")


def test_pillow_errors_from_decoding_are_one_line(tmp_path):
    """A truncated GIF frame and a cut-off palette PNG: ImageError with one line each."""
    buf = io.BytesIO()
    frames = [Image.new("P", (40, 30), i) for i in range(3)]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    for name, data in [("cut.gif", buf.getvalue()[:60]), ("cut.png", TRUNCATED_IHDR[:40])]:
        path = tmp_path / name
        path.write_bytes(data)
        refused(path, name)


def test_opened_files_are_closed(tmp_path):
    """Multi-frame files keep Pillow's file open after load(); load_image closes it, so a
    long-running server (or 100,000 fuzzed inputs) does not run out of file descriptors."""
    path = tmp_path / "anim.gif"
    frames = [Image.new("P", (8, 6), i) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        assert load_image(path).size == (8, 6)
    assert len(os.listdir("/proc/self/fd")) <= before + 2
