"""Image loading and LLaVA-1.5 preprocessing (pad to square, CLIP resize/crop/normalise).

The reference for `preprocess_image` is LLaVA-1.5's pipeline: `Image.open(f).convert("RGB")`,
`expand2square` with the CLIP mean colour, then transformers' CLIP image processor. In
transformers 5 the name `CLIPImageProcessor` is the torchvision backend; the reference here is
the PIL/numpy backend `CLIPImageProcessorPil` (PIL BICUBIC on uint8, float64 rescale, float32
normalise), which this module reproduces bit for bit with Pillow and numpy.
"""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from msd_engine.config import VisionConfig

ImageSource = str | os.PathLike | Image.Image | bytes
T = TypeVar("T")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# transformers' default rescale_factor; it multiplies by this in float64 rather than dividing.
_RESCALE = 1 / 255


class ImageError(ValueError):
    """An image that cannot be used: missing, unreadable, truncated, too large or empty."""


def load_image(source: ImageSource) -> Image.Image:
    """Open a path, encoded bytes or a PIL image, fully decode it and return it as RGB.

    EXIF orientation is deliberately NOT applied: LLaVA's code and transformers' processors
    ignore it, and the model's answers must match theirs for the same file.
    """
    if isinstance(source, Image.Image):
        name = "<PIL image>"
        # A caller's lazily opened image may still be truncated; surface that here.
        _decode(source.load, name)
        return _to_rgb(_check_size(source, name), name)
    if isinstance(source, bytes):
        name, fp = "<bytes>", io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        name, fp = os.fspath(source), source
    else:
        raise TypeError(f"image source must be a path, bytes or PIL.Image.Image, got {type(source).__name__}")
    image = _decode(lambda: _open_and_load(fp), name)
    try:
        return _to_rgb(_check_size(image, name), name)
    finally:
        image.close()


def _open_and_load(fp: str | os.PathLike | io.BytesIO) -> Image.Image:
    # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; an engine serving untrusted images
    # must refuse those too. catch_warnings restores the filters, and MAX_IMAGE_PIXELS is only read.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(fp)
        try:
            # Image.open only reads the header; load() decodes every pixel so that a truncated
            # or corrupt file fails here, not deep inside preprocessing.
            image.load()
        except Exception:
            image.close()  # release the file handle, then let _decode report the error
            raise
    return image


def _decode(load: Callable[[], T], name: str) -> T:
    """Run `load()`, translating Pillow's many failure modes into one ImageError naming `name`."""
    try:
        return load()
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (Pillow cannot identify its format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: image too large, refused as a possible decompression bomb ({exc}); "
                         "raise PIL.Image.MAX_IMAGE_PIXELS to accept it") from None
    except (OSError, SyntaxError, EOFError, ValueError) as exc:
        # Pillow reports truncation as OSError and malformed chunks as SyntaxError/EOFError/ValueError.
        raise ImageError(f"{name}: cannot decode image, truncated or corrupt ({exc})") from exc


def _check_size(image: Image.Image, name: str) -> Image.Image:
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{name}: image has zero size ({image.width}x{image.height})")
    return image


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way LLaVA does (`convert("RGB")`), except wide modes.

    Alpha is dropped, not composited: LLaVA-1.5 calls `convert("RGB")`. (transformers 5's own
    convert_to_rgb composites onto white instead; LLaVA's behaviour is the one the model saw.)
    Pillow's convert("RGB") clips wide modes to 255, turning 16-bit photos white, so they are
    scaled here: "I;16*" and "I" by >> 8 ("I" is how Pillow holds 16-bit PGM/PPM and TIFF data,
    so it is read as 0..65535 and clipped to it); "F" is read as 0..1 (the float-image
    convention of numpy/scikit-image and float TIFFs), clipped, NaN taken as 0.
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        wide = np.asarray(image).astype(np.int64)  # [H, W]
        gray = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "F":
        unit = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32)), 0.0, 1.0)  # [H, W]
        return Image.fromarray(np.rint(unit * 255.0).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        # Pillow asks for palette transparency to go through RGBA; the colours are the same.
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"{name}: cannot convert image mode {image.mode!r} to RGB ({exc})") from exc


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's pad-to-square: paste `image` centred on a `background`-filled square canvas.

    The offset along the short side is `(long - short) // 2`, so an odd remainder puts the
    extra row/column of padding after the image, as in LLaVA.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _resize_shortest_edge(image: Image.Image, size: int) -> Image.Image:
    # transformers' get_resize_output_image_size(default_to_square=False): the long side is
    # int(size * long / short) in float arithmetic (truncation, not rounding).
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    return image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def _center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """[H, W, C] -> [size, size, C], offsets rounded down as in transformers' center_crop."""
    height, width = pixels.shape[:2]
    assert height >= size and width >= size, f"crop {size} larger than image {width}x{height}"
    top, left = (height - size) // 2, (width - size) // 2
    return pixels[top:top + size, left:left + size]


def _clip_transform(image: Image.Image, vision: VisionConfig) -> torch.Tensor:
    """CLIPImageProcessorPil on an RGB image: resize, centre crop, rescale, normalise."""
    size = vision.image_size
    pixels = _center_crop(np.asarray(_resize_shortest_edge(image, size)), size)  # [S, S, 3] uint8
    # Same dtypes and operation order as transformers, so the floats agree bit for bit.
    scaled = (pixels.astype(np.float64) * _RESCALE).astype(np.float32)
    mean = np.asarray(vision.image_mean, dtype=np.float32)
    std = np.asarray(vision.image_std, dtype=np.float32)
    normalised = (scaled - mean) / std  # [S, S, 3]
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))  # [3, S, S]


def preprocess_image(image: Image.Image, vision: VisionConfig) -> torch.Tensor:
    """One image -> float32 [3, S, S] pixel values for the CLIP tower (S = vision.image_size)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_image takes a PIL.Image.Image, got {type(image).__name__}")
    name = "<PIL image>"
    image = _check_size(image, name)
    if image.mode != "RGB":
        image = _to_rgb(image, name)
    # LLaVA pads with the mean colour truncated to uint8, so padding normalises to ~0, not exactly 0.
    background = tuple(int(255 * m) for m in vision.image_mean)
    return _clip_transform(expand2square(image, background), vision)


def preprocess_images(images: Sequence[Image.Image], vision: VisionConfig) -> torch.Tensor:
    """A batch of images -> float32 [N, 3, S, S]; N may be 0."""
    size = vision.image_size
    if len(images) == 0:
        return torch.empty(0, 3, size, size, dtype=torch.float32)
    return torch.stack([preprocess_image(image, vision) for image in images])
