"""Fuzz the image loader: file bytes of any format Pillow opens -> preprocess (load_image: open,
size limit, decode, to_rgb; Pan & Scan crops; pixels).

The crops and pixels are computed at 16 x 16 with Pan & Scan from 4-pixel crops instead of 896 and
256: the same code, sized so that the small seeds reach it and throughput stays high.

Seeds (Pillow-written, a few hundred bytes each): PNG in RGB, RGBA, LA, 1-bit, 16-bit grayscale
(I;16) and palette with transparency; JPEG (RGB, grayscale, CMYK); GIF (two frames, transparency);
WebP (lossy and lossless with alpha); BMP; TIFF; ICO; PPM; TGA; a wide palette image that Pan & Scan
cuts into crops.
"""
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Target, instrumented, main, write  # noqa: E402

with instrumented():
    from gemmalab.images import ImageError, PanAndScan, preprocess

import numpy as np  # noqa: E402

PAN_AND_SCAN = PanAndScan(min_crop_size=4, max_num_crops=4, min_ratio_to_activate=1.2)


def one(data: bytes, scratch: Path) -> None:
    path = write(scratch, "image", data)
    pixels, crops = preprocess([path], size=16, pan_and_scan=PAN_AND_SCAN)
    assert pixels.shape == (1 + crops[0], 3, 16, 16), (pixels.shape, crops)


def _image(mode: str, size: tuple[int, int]):
    from PIL import Image
    rng = np.random.default_rng(0)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").quantize(8)
    return rgba.convert(mode)


def _save(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def seeds(d: Path) -> list[bytes]:
    small = (8, 6)
    palette = _image("P", small)
    palette.info["transparency"] = 0
    frames = [_image("P", small), _image("P", small).transpose(0)]
    out = [_save(_image("RGB", small), "PNG"), _save(_image("RGBA", small), "PNG"),
           _save(_image("LA", small), "PNG"), _save(_image("1", small), "PNG"),
           _save(_image("I;16", small), "PNG"), _save(palette, "PNG", transparency=0),
           _save(_image("RGB", small), "JPEG", quality=50), _save(_image("L", small), "JPEG"),
           _save(_image("CMYK", small), "JPEG"),
           _save(frames[0], "GIF", save_all=True, append_images=frames[1:], transparency=0),
           _save(_image("RGB", small), "WEBP", quality=30),
           _save(_image("RGBA", small), "WEBP", lossless=True),
           _save(_image("RGB", small), "BMP"), _save(_image("P", small), "BMP"),
           _save(_image("RGB", small), "TIFF"), _save(_image("RGBA", (16, 16)), "ICO", sizes=[(16, 16)]),
           _save(_image("RGB", small), "PPM"), _save(_image("RGB", small), "TGA", compression="tga_rle"),
           _save(_image("P", (40, 10)), "PNG")]  # wide: Pan & Scan crops
    return out


if __name__ == "__main__":
    main(Target("image", one, (ImageError,), seeds,
                notes="image file bytes -> preprocess([path], size=16, Pan & Scan from 4-px crops): "
                      "load_image (Image.open, MAX_PIXELS from the header, load, to_rgb), crops, pixels"))
