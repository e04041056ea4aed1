"""Images -> pixel tensors for the vision encoder, Pan & Scan, and the image tokens of a prompt.

Reproduces transformers' Gemma3Processor / Gemma3ImageProcessor (PIL backend), which is what the hub
`preprocessor_config.json` describes (spec 3.4-3.5):

  1. RGB: Pillow's `convert("RGB")`; an image with transparency is composited onto white first.
  2. Pan & Scan (off by default): a landscape/portrait image whose aspect ratio is at least 1.2 is cut
     into 2-4 non-overlapping crops side by side (or stacked), each at least 256 px; the crops come
     after the whole image, each giving its own 256 soft tokens.
  3. Each image and crop: resized to 896 x 896 (squashed, Pillow BILINEAR), x/255, (x - 0.5)/0.5.

What is accepted: a path (anything Pillow decodes: PNG, JPEG, GIF (first frame), BMP, TIFF, WebP, ...),
a PIL image, or a uint8 numpy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (RGBA), or a float
array with values in [0, 1] (rounded to uint8). Grayscale, palette, CMYK and RGBA images are converted
as in (1). Tiny images (even 1 x 1) are upscaled. The EXIF orientation is not applied (as in
transformers). Refused with an ImageError: missing or unreadable files, truncated or corrupt data,
other array shapes and dtypes, empty images, and images over MAX_PIXELS (checked from the header,
before decoding).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

# Pillow's own decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS, ~13,400 x 13,400): decoding
# such an image takes gigabytes, and it is downscaled to 896 px anyway.
MAX_PIXELS = 178_956_970

ImageInput = Union[str, os.PathLike, "PIL.Image.Image", np.ndarray]  # noqa: F821


class ImageError(ValueError):
    """An image that cannot be used: missing, unreadable, corrupt, empty or too large."""


@dataclass(frozen=True)
class PanAndScan:
    """transformers' Gemma3Processor defaults (gemma_pytorch activates at 1.5 instead; spec 10.13)."""
    min_crop_size: int = 256
    max_num_crops: int = 4
    min_ratio_to_activate: float = 1.2


# ---- loading --------------------------------------------------------------------------------------

def load_image(image: ImageInput, what: str = "image"):
    """A decoded RGB PIL image, or an ImageError that says what is wrong with the input."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        img = _open(Path(image))
        what = str(image)
    elif isinstance(image, Image.Image):
        img = image
    elif isinstance(image, np.ndarray):
        img = _from_array(image, what)
    else:
        raise ImageError(f"{what}: expected a file path, a PIL image or a numpy array, "
                         f"not {type(image).__name__}")
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError(f"{what} is empty ({w} x {h} pixels)")
    if w * h > MAX_PIXELS:
        raise ImageError(f"{what} is too large: {w} x {h} = {w * h:,} pixels (the limit is "
                         f"{MAX_PIXELS:,}); downscale it first")
    try:
        return to_rgb(img)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a lazily opened PIL image whose data is broken, a
        # mode Pillow cannot convert; Pillow raises OSError, ValueError and others
        raise ImageError(f"{what} cannot be decoded: {_one_line(e)}") from None
    finally:
        if img is not image:  # opened here: close the file now (multi-frame files keep it open)
            img.close()


def _one_line(e: BaseException) -> str:
    """A Pillow error as one short line (ImageError messages are printed as one line)."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 200 else msg[:200] + "..."


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise ImageError(f"no such image file: {path}")
    if not path.is_file():
        raise ImageError(f"{path} is not a file")
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image format Pillow can read (PNG, JPEG, GIF, BMP, TIFF, "
                         "WebP, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # the warning: -W error
        raise ImageError(f"{path} is too large to decode (over {MAX_PIXELS:,} pixels); "
                         "downscale it first") from None
    except OSError as e:
        raise ImageError(f"cannot read {path}: {_one_line(e)}") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow's format plugins raise ValueError, EOFError, ...
        raise ImageError(f"{path} is corrupt: {_one_line(e)}") from None
    try:
        w, h = img.size
        if w * h > MAX_PIXELS:  # before decoding the pixels
            raise ImageError(f"{path} is too large: {w} x {h} = {w * h:,} pixels (the limit is "
                             f"{MAX_PIXELS:,}); downscale it first")
        img.load()
    except (ImageError, MemoryError):
        img.close()
        raise
    except Exception as e:  # noqa: BLE001 - truncated data raises OSError; broken codecs others
        img.close()
        raise ImageError(f"{path} is corrupt or truncated: {_one_line(e)}") from None
    return img


def _from_array(a: np.ndarray, what: str):
    from PIL import Image

    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        hint = (" (channels first? use np.moveaxis(a, 0, -1))"
                if a.ndim == 3 and a.shape[0] in (1, 3, 4) else "")
        raise ImageError(f"{what}: an array must be (H, W), (H, W, 3) or (H, W, 4), got shape "
                         f"{a.shape}{hint}")
    if a.size == 0:
        raise ImageError(f"{what} is empty (shape {a.shape})")
    if a.dtype == np.uint8:
        pass
    elif np.issubdtype(a.dtype, np.floating):
        if not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
            raise ImageError(f"{what}: a float array must hold values in [0, 1]")
        a = np.round(a * 255.0).astype(np.uint8)
    else:
        raise ImageError(f"{what}: an array must be uint8 (0-255) or float in [0, 1], not {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a))


def to_rgb(img):
    """transformers' convert_to_rgb: transparency composited onto white, then Pillow's RGB."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# ---- Pan & Scan and pixels ------------------------------------------------------------------------

def pan_and_scan_boxes(width: int, height: int, p: PanAndScan = PanAndScan()
                       ) -> list[tuple[int, int, int, int]]:
    """Crop boxes (left, top, right, bottom), row-major, or [] when P&S does not apply (spec 3.5)."""
    if width >= height:
        if width / height < p.min_ratio_to_activate:
            return []
        n_w = min(math.floor(width / p.min_crop_size), math.floor(width / height + 0.5))
        n_w, n_h = min(p.max_num_crops, max(2, n_w)), 1
    else:
        if height / width < p.min_ratio_to_activate:
            return []
        n_h = min(math.floor(height / p.min_crop_size), math.floor(height / width + 0.5))
        n_w, n_h = 1, min(p.max_num_crops, max(2, n_h))
    crop_w, crop_h = math.ceil(width / n_w), math.ceil(height / n_h)
    if min(crop_w, crop_h) < p.min_crop_size:
        return []
    return [(j * crop_w, i * crop_h, min((j + 1) * crop_w, width), min((i + 1) * crop_h, height))
            for i in range(n_h) for j in range(n_w)]


def to_pixels(img, size: int) -> torch.Tensor:
    """(3, size, size) float32 in [-1, 1] from an RGB PIL image, exactly as transformers computes it."""
    from PIL import Image

    x = np.asarray(img.resize((size, size), resample=Image.BILINEAR))  # (size, size, 3) uint8
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # transformers' rescale, in float64
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def preprocess(images: Sequence[ImageInput], size: int = 896,
               pan_and_scan: bool | PanAndScan = False) -> tuple[torch.Tensor, list[int]]:
    """pixel_values (N, 3, size, size) and the number of crops of each image.

    Each image gives its full view followed by its crops (none unless Pan & Scan applies), so
    N = len(images) + sum(num_crops).
    """
    p = PanAndScan() if pan_and_scan is True else pan_and_scan or None
    pixels, num_crops = [], []
    for k, image in enumerate(images):
        rgb = load_image(image, what=f"image {k}")
        boxes = pan_and_scan_boxes(*rgb.size, p) if p else []
        pixels.append(to_pixels(rgb, size))
        if boxes:
            array = np.asarray(rgb)  # crops are cut from the RGB array like transformers does
            pixels += [to_pixels(_array_image(array[t:b, l:r]), size) for l, t, r, b in boxes]
        num_crops.append(len(boxes))
    if not pixels:
        return torch.zeros(0, 3, size, size), []
    return torch.stack(pixels), num_crops


def _array_image(a: np.ndarray):
    from PIL import Image
    return Image.fromarray(np.ascontiguousarray(a))


# ---- prompt layout --------------------------------------------------------------------------------

def image_text(num_crops: int, boi: str = "<start_of_image>", eoi: str = "<end_of_image>") -> str:
    """What replaces one `<start_of_image>` marker, with each image's soft tokens left out: they go
    between <start_of_image> and <end_of_image> (`insert_soft_tokens`). transformers'
    Gemma3Processor writes `\\n\\n<start_of_image>` + 256 x `<image_soft_token>` +
    `<end_of_image>\\n\\n`, and for Pan & Scan the wording below; since all three are atomic special
    tokens, tokenizing without the soft tokens and inserting their ids gives the same ids."""
    block = f"\n\n{boi}{eoi}\n\n"
    if not num_crops:
        return block
    return (f"Here is the original image {block} and here are some crops to help you see better "
            + " ".join([block] * num_crops))


def expand_image_markers(text: str, num_crops: Sequence[int], boi: str = "<start_of_image>",
                         eoi: str = "<end_of_image>") -> str:
    """Replace the k-th `boi` marker of `text` by `image_text(num_crops[k])`."""
    parts = text.split(boi)
    if len(parts) - 1 != len(num_crops):
        raise ValueError(f"the prompt has {len(parts) - 1} {boi} markers for {len(num_crops)} "
                         f"images; write one {boi} where each image goes")
    out = [parts[0]]
    for k, rest in enumerate(parts[1:]):
        out += [image_text(num_crops[k], boi, eoi), rest]
    return "".join(out)


def insert_soft_tokens(ids: Sequence[int], boi_id: int, image_token_id: int, n: int) -> list[int]:
    """`n` placeholder ids after every <start_of_image> id."""
    out: list[int] = []
    for i in ids:
        out.append(i)
        if i == boi_id:
            out += [image_token_id] * n
    return out


def prompt_ids(tokenizer, config, prompt: str | Sequence[int], num_crops: Sequence[int],
               add_bos: bool = True) -> list[int]:
    """Token ids of a prompt with images, laid out as transformers' Gemma3Processor does.

    `prompt` text or ids holds one <start_of_image> marker per image (of `config`, a
    Gemma3MultimodalConfig); text without any marker gets the images at its start. Text is
    expanded, then tokenized as a whole (so the `\\n\\n` around an image tokenizes together with the
    text next to it, as in transformers); each <start_of_image> id of an ids prompt is replaced by
    the separately tokenized image text. Then the soft-token placeholders go in.
    """
    boi, eoi = tokenizer.id_to_piece(config.boi_token_id), tokenizer.id_to_piece(config.eoi_token_id)
    if isinstance(prompt, str):
        if boi not in prompt and num_crops:
            prompt = boi * len(num_crops) + prompt
        ids = tokenizer.encode(expand_image_markers(prompt, num_crops, boi, eoi), add_bos=add_bos)
    else:
        ids = list(prompt)
        n_markers = ids.count(config.boi_token_id)
        if n_markers != len(num_crops):
            raise ValueError(f"the prompt ids hold {n_markers} <start_of_image> ids "
                             f"({config.boi_token_id}) for {len(num_crops)} images")
        crops = iter(num_crops)
        ids = [j for i in ids for j in ([i] if i != config.boi_token_id else
                                         tokenizer.encode(image_text(next(crops), boi, eoi),
                                                          add_bos=False))]
    if config.image_token_id in ids:
        raise ValueError("the prompt already holds image soft tokens "
                         f"({config.image_token_id}); write one {boi} per image instead")
    return insert_soft_tokens(ids, config.boi_token_id, config.image_token_id,
                              config.mm_tokens_per_image)
