import io
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import bundle_predict, catalog, images, ingest
from core.errors import LoupeError
from core.workspace import decode_budget_bytes
from tests.conftest import TESTER

# The EXIF orientations, as the transposition that makes the stored pixels upright (EXIF 2.3, tag 0x0112).
UPRIGHT = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def saved(image: Image.Image, fmt: str, **save_args) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **save_args)
    return out.getvalue()


def scene(size=(48, 32)) -> Image.Image:
    """An asymmetric RGB picture: gradients and a block in one corner, so turning or flipping it shows."""
    x, y = np.meshgrid(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1]))
    pixels = np.stack([x * 255, y * 255, (1 - x) * 160 + 40], axis=-1).astype(np.uint8)
    pixels[: size[1] // 3, : size[0] // 4] = (250, 20, 20)
    return Image.fromarray(pixels)


def grey_ramp(dtype, top: float, size=(48, 32)) -> np.ndarray:
    x, y = np.meshgrid(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1]))
    return ((x * 0.7 + y * 0.3) * top).astype(dtype)


def with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return saved(scene(), "JPEG", quality=95, exif=exif)


def decode_corpus() -> dict[str, bytes]:
    """Every kind of file whose decoding has differed between tools: depth, colour model, transparency,
    orientation, encoding."""
    grey16 = grey_ramp(np.uint16, 65535)
    palette = scene().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    alpha = scene().convert("RGBA")
    alpha.putalpha(Image.fromarray(grey_ramp(np.uint8, 255)))
    corpus = {
        "grey16.png": saved(Image.fromarray(grey16), "PNG"),
        "grey16.tif": saved(Image.fromarray(grey16), "TIFF"),
        "float.tif": saved(Image.fromarray(grey_ramp(np.float32, 3.5) - 1.0), "TIFF"),
        "grey16_big_endian.tif": saved(Image.fromarray(grey16.astype(">u2")), "TIFF"),
        "cmyk.jpg": saved(scene().convert("CMYK"), "JPEG", quality=95),
        "palette_trns.png": saved(palette, "PNG", transparency=3),
        "grey_alpha.png": saved(alpha.convert("LA"), "PNG"),
        "one_bit.png": saved(scene().convert("1"), "PNG"),
        "progressive.jpg": saved(scene(), "JPEG", quality=95, progressive=True),
        "alpha.webp": saved(alpha, "WEBP", lossless=True),
    }
    corpus |= {f"orientation{n}.jpg": with_orientation(n) for n in UPRIGHT}
    return corpus


def test_the_corpus_holds_the_modes_it_claims():
    modes = {name: Image.open(io.BytesIO(data)).mode for name, data in decode_corpus().items()}
    assert modes["grey16.png"] == modes["grey16.tif"] == "I;16" and modes["grey16_big_endian.tif"] == "I;16B"
    assert modes["float.tif"] == "F" and modes["cmyk.jpg"] == "CMYK" and modes["palette_trns.png"] == "P"
    assert (modes["grey_alpha.png"], modes["one_bit.png"], modes["alpha.webp"]) == ("LA", "1", "RGBA")


def test_sixteen_bit_and_float_images_are_scaled_not_clipped():
    ramp = np.array([[0, 21845, 43690, 65535]], dtype=np.uint16)
    for data in (saved(Image.fromarray(ramp), "PNG"), saved(Image.fromarray(ramp.astype(">u2")), "TIFF")):
        assert np.asarray(images.decode_image(data).rgb)[0, :, 0].tolist() == [0, 85, 170, 255]
    floats = np.array([[-1.0, np.nan, 0.0, 1.0, np.inf]], dtype=np.float32)
    grey = np.asarray(images.decode_image(saved(Image.fromarray(floats), "TIFF")).rgb)[0, :, 0]
    # The finite range spans 0..255; NaN goes to its bottom, infinity to its top.
    assert grey.tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("orientation", list(UPRIGHT))
def test_each_exif_orientation_is_turned_upright(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    picture = scene()
    decoded = images.decode_image(saved(picture, "PNG", exif=exif))
    method = UPRIGHT[orientation]
    expected = picture if method is None else picture.transpose(method)
    assert np.array_equal(np.asarray(decoded.rgb), np.asarray(expected))


def test_transparency_is_flattened_onto_white_the_same_way_for_every_alpha_mode():
    clear = images.decode_image(saved(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG")).rgb
    half = images.decode_image(saved(Image.new("LA", (8, 8), (0, 128)), "PNG")).rgb
    assert clear.getpixel((0, 0)) == (255, 255, 255) and half.getpixel((0, 0)) == (127, 127, 127)


def test_decode_cost_is_width_times_height_times_bands_times_bytes_per_sample():
    assert images.decode_cost("I;16", 10, 10) == 100 * 2
    assert images.decode_cost("F", 10, 10) == 100 * 4
    assert images.decode_cost("RGBA", 10, 10) == 100 * 4
    assert images.decode_cost("RGB", 10, 10) == 100 * 3
    assert images.decode_cost("1", 10, 10) == images.decode_cost("L", 10, 10) == 100


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_claiming(width: int, height: int) -> bytes:
    """A few dozen bytes: a 16-bit RGBA PNG header claiming width x height, and almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "side, reason",
    [
        (12_000, "decoded size 549 MB exceeds this workspace's 256 MB budget"),
        (30_000, "too many pixels"),
    ],
)
def test_a_tiny_file_claiming_huge_dimensions_is_refused_before_any_pixel_is_decoded(side, reason):
    data = png_header_claiming(side, side)
    assert len(data) < 100
    tracemalloc.start()
    try:
        with pytest.raises(LoupeError, match=reason):
            images.decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_a_float_image_is_converted_without_a_full_size_float64_copy():
    pixels = np.random.default_rng(0).random((1500, 1500), dtype=np.float32)
    image = Image.fromarray(pixels)
    tracemalloc.start()
    try:
        rgb = images.to_rgb(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # float64 of the whole image alone would be 18 MB.
    assert rgb.size == (1500, 1500) and peak < 4_000_000


def test_the_workspace_budget_applies_on_import(workspace, db):
    catalog.set_decode_budget_bytes(db, 16 * 2**20, actor=TESTER)
    big = saved(Image.new("RGB", (3000, 3000), (10, 20, 30)), "PNG")
    outcome = ingest.ingest_bytes(workspace, db, big, "big.png", actor=TESTER)
    assert outcome.status == "rejected"
    assert "decoded size 26 MB exceeds this workspace's 16 MB budget" in outcome.reason
    catalog.set_decode_budget_bytes(db, 32 * 2**20, actor=TESTER)
    assert ingest.ingest_bytes(workspace, db, big, "big.png", actor=TESTER).status == "added"


@pytest.mark.parametrize("budget", [1024, 2**40, "256 MB", True, 256.0])
def test_a_decode_budget_outside_its_bounds_is_refused(db, budget):
    with pytest.raises(LoupeError, match="decode budget"):
        catalog.set_decode_budget_bytes(db, budget, actor=TESTER)
    catalog.set_setting(db, "decode_budget_bytes", budget)
    with pytest.raises(LoupeError, match="decode budget setting is invalid"):
        decode_budget_bytes(db)


def test_a_workspace_decodes_within_the_default_budget_until_told_otherwise(db):
    assert decode_budget_bytes(db) == images.DEFAULT_DECODE_BUDGET_BYTES == 256 * 2**20


def test_only_a_regular_file_of_a_sane_size_is_read(tmp_path):
    with pytest.raises(LoupeError, match="not a regular file"):
        images.open_image_rgb(tmp_path)
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(LoupeError, match="not a regular file"):
        images.open_image_rgb(tmp_path / "pipe.png")
    with pytest.raises(LoupeError, match="no such file"):
        images.open_image_rgb(tmp_path / "absent.png")
    with open(tmp_path / "huge.png", "wb") as sparse:
        sparse.truncate(images.MAX_FILE_BYTES + 1)
    with pytest.raises(LoupeError, match="larger than"):
        images.open_image_rgb(tmp_path / "huge.png")


def test_the_bundle_decodes_each_corpus_file_exactly_as_import_does(tmp_path):
    config = {"decode_budget_bytes": images.DEFAULT_DECODE_BUDGET_BYTES}
    for name, data in decode_corpus().items():
        (tmp_path / name).write_bytes(data)
        imported = images.decode_image(data).rgb
        bundled = bundle_predict.load_image(tmp_path / name, config)
        assert np.array_equal(np.asarray(bundled), np.asarray(imported)), name


def test_the_decoder_needs_only_the_standard_library_numpy_and_pillow():
    import ast
    import sys

    tree = ast.parse(Path(images.__file__).read_text())
    absolute = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    } | {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert absolute - set(sys.stdlib_module_names) == {"numpy", "PIL"}
