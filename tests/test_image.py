"""msd_engine.image against transformers' PIL CLIP processor and plainly written expectations."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from msd_engine.config import VisionConfig
from msd_engine.image import (ImageError, _clip_transform, expand2square, load_image, preprocess_image,
                              preprocess_images)

transformers = pytest.importorskip("transformers")
# transformers 5 maps `CLIPImageProcessor` to a torchvision backend; the PIL/numpy one is the
# slow processor LLaVA-1.5 was trained with.
from transformers import CLIPImageProcessorPil  # noqa: E402
from transformers.image_transforms import convert_to_rgb  # noqa: E402

LLAVA = VisionConfig()  # 336 px, CLIP mean/std
SMALL = VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     image_size=30, patch_size=10, image_mean=(0.5, 0.25, 0.75), image_std=(0.2, 0.3, 0.4))
RNG = np.random.default_rng(1234)


def reference_processor(vision: VisionConfig) -> CLIPImageProcessorPil:
    """Configured like llava-hf/llava-1.5-7b-hf's preprocessor_config.json."""
    size = vision.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
                                 do_convert_rgb=True, image_mean=list(vision.image_mean),
                                 image_std=list(vision.image_std))


def numpy_pad_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square written plainly with numpy."""
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    side = max(height, width)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = background
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top:top + height, left:left + width] = pixels
    return Image.fromarray(canvas)


def reference(image_rgb: Image.Image, vision: VisionConfig) -> torch.Tensor:
    background = tuple(int(255 * m) for m in vision.image_mean)
    square = numpy_pad_to_square(image_rgb, background)
    out = reference_processor(vision)(images=square, return_tensors="np")["pixel_values"][0]
    return torch.from_numpy(out)


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    # Both sides feed identical uint8 pixels through the same float64 rescale and float32
    # normalise in the same order, so they agree bit for bit; no tolerance is needed. A one-level
    # uint8 difference anywhere would show up as ~0.015 here.
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert torch.equal(ours, theirs), f"max |ours - transformers| = {diff}"


def random_rgb(width: int, height: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8))


PHOTOS = {
    "astronaut": skimage.data.astronaut, "chelsea": skimage.data.chelsea, "coffee": skimage.data.coffee,
    "camera": skimage.data.camera, "rocket": skimage.data.rocket, "coins": skimage.data.coins,
    "page": skimage.data.page, "colorwheel": skimage.data.colorwheel,
}


@pytest.mark.parametrize("vision", [LLAVA, SMALL], ids=["336", "30"])
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_photo_matches_transformers(name: str, vision: VisionConfig) -> None:
    photo = Image.fromarray(PHOTOS[name]())  # camera/coins/page are grayscale (mode L)
    ours = preprocess_image(load_image(photo), vision)
    assert_same(ours, reference(load_image(photo), vision))
    assert ours.shape == (3, vision.image_size, vision.image_size)


@pytest.mark.parametrize("vision", [LLAVA, SMALL], ids=["336", "30"])
@pytest.mark.parametrize("width,height", [(1, 1), (1, 500), (500, 1), (337, 335), (17, 9), (9, 17), (336, 336)])
def test_odd_sizes_match_transformers(width: int, height: int, vision: VisionConfig) -> None:
    image = random_rgb(width, height)
    assert_same(preprocess_image(image, vision), reference(image, vision))


@pytest.mark.parametrize("width,height", [(451, 300), (300, 451), (17, 9), (1, 500), (337, 335), (31, 29)])
def test_resize_and_crop_match_transformers_without_padding(width: int, height: int) -> None:
    # The shortest-edge size rounding and crop offsets only matter for non-square inputs, which
    # padding hides; check them on the raw images.
    image = random_rgb(width, height)
    for vision in (LLAVA, SMALL):
        theirs = reference_processor(vision)(images=image, return_tensors="np")["pixel_values"][0]
        assert_same(_clip_transform(image, vision), torch.from_numpy(theirs))


def test_expand2square_matches_numpy() -> None:
    background = (122, 116, 104)
    for width, height in [(1, 1), (1, 500), (500, 1), (337, 335), (17, 9), (9, 17), (40, 40), (10, 13)]:
        image = random_rgb(width, height)
        ours = np.asarray(expand2square(image, background))
        np.testing.assert_array_equal(ours, np.asarray(numpy_pad_to_square(image, background)))
    # The background is the CLIP mean truncated to uint8, as LLaVA computes it.
    padded = preprocess_image(Image.new("RGB", (1, 8), (0, 0, 0)), LLAVA)
    expected = (np.array([122, 116, 104]) / 255 - np.array(LLAVA.image_mean)) / np.array(LLAVA.image_std)
    np.testing.assert_allclose(padded[:, :, -1].mean(dim=1).numpy(), expected, atol=1e-6)


def test_batch() -> None:
    images = [random_rgb(20, 10), Image.fromarray(skimage.data.camera())]
    batch = preprocess_images(images, SMALL)
    assert batch.shape == (2, 3, 30, 30) and batch.dtype == torch.float32
    for row, image in zip(batch, images):
        assert torch.equal(row, preprocess_image(image, SMALL))
    assert preprocess_images([], SMALL).shape == (0, 3, 30, 30)


# ---- mode conversion ------------------------------------------------------------------------


def rgb_of(image: Image.Image) -> np.ndarray:
    out = load_image(image)
    assert out.mode == "RGB" and out.size == image.size
    return np.asarray(out)


def gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def test_rgba_and_la_drop_alpha_like_llava() -> None:
    # LLaVA calls convert("RGB"), which ignores alpha; transformers 5's convert_to_rgb would
    # composite onto white instead, so this deliberately differs from it for translucent pixels.
    logo = skimage.data.logo()  # a real RGBA image with transparent areas
    np.testing.assert_array_equal(rgb_of(Image.fromarray(logo)), logo[..., :3])
    la = RNG.integers(0, 256, (7, 5, 2), dtype=np.uint8)
    np.testing.assert_array_equal(rgb_of(Image.fromarray(la, "LA")), gray3(la[..., 0]))


def test_palette_and_gray_modes() -> None:
    gray = RNG.integers(0, 256, (9, 17), dtype=np.uint8)
    np.testing.assert_array_equal(rgb_of(Image.fromarray(gray)), gray3(gray))
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (9, 17), dtype=np.uint8)
    p_image = Image.fromarray(index, "P")
    p_image.putpalette(palette.tobytes())
    np.testing.assert_array_equal(rgb_of(p_image), palette[index])
    p_image.info["transparency"] = int(index[0, 0])  # transparency keeps the palette colour
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(rgb_of(p_image), palette[index])
    bits = RNG.integers(0, 2, (9, 17)).astype(bool)
    np.testing.assert_array_equal(rgb_of(Image.fromarray(bits)), gray3(bits.astype(np.uint8) * 255))


def test_cmyk() -> None:
    cmyk = RNG.integers(0, 256, (9, 17, 4), dtype=np.uint8)
    image = Image.frombytes("CMYK", (17, 9), cmyk.tobytes())
    c, k = cmyk[..., :3].astype(np.int64), cmyk[..., 3:].astype(np.int64)
    np.testing.assert_array_equal(rgb_of(image), np.rint((255 - c) * (255 - k) / 255).astype(np.uint8))


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "RGB"])
def test_opaque_modes_agree_with_transformers_convert(mode: str) -> None:
    image = Image.fromarray(skimage.data.chelsea()).convert(mode)
    np.testing.assert_array_equal(rgb_of(image), convert_to_rgb(image, return_numpy=True))


def test_sixteen_bit_scales_to_eight_bit(tmp_path: Path) -> None:
    levels = np.arange(256, dtype=np.uint16)
    low_byte = (levels * 97) % 256  # arbitrary low bytes must not change the 8-bit level
    gradient = np.tile(levels * 256 + low_byte, (3, 1)).astype(np.uint16)  # [3, 256]
    for image in (Image.fromarray(gradient), Image.fromarray(gradient.astype(">u2"))):
        assert image.mode in ("I;16", "I;16B")
        np.testing.assert_array_equal(rgb_of(image), gray3(np.tile(levels.astype(np.uint8), (3, 1))))
    path = tmp_path / "gradient16.png"  # Pillow reopens a 16-bit PNG as I;16
    Image.fromarray(gradient).save(path)
    np.testing.assert_array_equal(load_image(path), gray3(np.tile(levels.astype(np.uint8), (3, 1))))


def test_int32_and_float_modes() -> None:
    wide = np.array([[-5, 0, 255, 256, 65535, 70000]], dtype=np.int32)
    np.testing.assert_array_equal(rgb_of(Image.fromarray(wide, "I")), gray3(np.array([[0, 0, 0, 1, 255, 255]])))
    unit = np.array([[-1.0, 0.0, 0.5, 1 / 255, 1.0, 2.0, np.nan]], dtype=np.float32)
    expected = gray3(np.array([[0, 0, 128, 1, 255, 255, 0]]))
    np.testing.assert_array_equal(rgb_of(Image.fromarray(unit, "F")), expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1", "I;16"])
def test_every_mode_preprocesses_like_its_rgb(mode: str) -> None:
    image = Image.fromarray(skimage.data.coffee()).resize((45, 30)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    rgb = load_image(image)
    assert_same(preprocess_image(image, SMALL), reference(rgb, SMALL))


def test_sources_path_pathlike_bytes(tmp_path: Path) -> None:
    photo = Image.fromarray(skimage.data.chelsea())
    path = tmp_path / "cat.png"
    photo.save(path)
    expected = np.asarray(photo)
    for source in (path, str(path), path.read_bytes()):
        np.testing.assert_array_equal(np.asarray(load_image(source)), expected)
    with pytest.raises(TypeError, match="ndarray"):
        load_image(expected)  # type: ignore[arg-type]


def test_exif_orientation_is_not_applied(tmp_path: Path) -> None:
    image = random_rgb(20, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW"; LLaVA/transformers ignore it, so must we
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 10)


# ---- errors ---------------------------------------------------------------------------------


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, fmt)
    return buffer.getvalue()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"nope\.png: no such file"):
        load_image(tmp_path / "nope.png")


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match=r"x\.png: not an image file"):
        load_image(path)
    with pytest.raises(ImageError, match=r"<bytes>: not an image file"):
        load_image(b"GIF89a but not really")


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated(tmp_path: Path, fmt: str, suffix: str) -> None:
    data = encoded(fmt)
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=rf"cut\.{suffix}: cannot decode image, truncated or corrupt .*truncated"):
        load_image(path)
    with pytest.raises(ImageError, match=r"<bytes>: cannot decode image.*truncated"):
        load_image(data[: len(data) - 100])


def test_lazy_truncated_pil_image(tmp_path: Path) -> None:
    data = encoded("JPEG")
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))  # header only, pixels not decoded yet
    with pytest.raises(ImageError, match=r"<PIL image>: cannot decode image.*truncated"):
        load_image(lazy)


@pytest.mark.parametrize("width,band", [(40, "warning"), (80, "error")])
def test_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, width: int, band: str) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "bomb.png"
    Image.new("RGB", (width, 30)).save(path)  # 1200 px only warns (> 1000); 2400 px errors (> 2000)
    assert (width * 30 > 2000) == (band == "error")
    filters_before = list(warnings.filters)
    with pytest.raises(ImageError, match=r"bomb\.png: image too large, refused as a possible decompression bomb"):
        load_image(path)
    assert warnings.filters == filters_before
    assert Image.MAX_IMAGE_PIXELS == 1000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert load_image(path).size == (width, 30)


def test_zero_size() -> None:
    for size in ((0, 5), (5, 0), (0, 0)):
        with pytest.raises(ImageError, match=r"<PIL image>: image has zero size"):
            load_image(Image.new("RGB", size))
        with pytest.raises(ImageError, match=r"<PIL image>: image has zero size"):
            preprocess_image(Image.new("RGB", size), LLAVA)


def test_unconvertible_mode() -> None:
    with pytest.raises(ImageError, match=r"<PIL image>: cannot convert image mode 'La'"):
        load_image(Image.new("La", (3, 3)))
