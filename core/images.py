"""The one place untrusted bytes become pixels: import, thumbnails, training, Grad-CAM, export and
prediction all decode through `decode_image`, so a photo looks the same to every stage.

This file needs only the standard library, numpy and Pillow: every exported model bundle ships
it beside its `predict.py`, so the bundle decodes exactly as Loupe does without Loupe installed.
"""

from __future__ import annotations

import io
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

try:
    from .errors import LoupeError
except ImportError:
    # Shipped in a bundle, where Loupe's package is absent: the same role, defined here.
    class LoupeError(Exception):
        """A problem the user can fix; its message is shown to them as is."""


# Pillow's format name -> the extension the original bytes are stored under.
ALLOWED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif", "GIF": "gif"}
# Many cameras and phones write MPO: a JPEG with further pictures appended. Its first picture is the photo.
FORMAT_ALIASES = {"MPO": "JPEG"}
MAX_FILE_BYTES = 200 * 1024 * 1024
THUMB_SIZE = 256
MB = 2**20
DEFAULT_DECODE_BUDGET_BYTES = 256 * MB
MIN_DECODE_BUDGET_BYTES = 16 * MB
MAX_DECODE_BUDGET_BYTES = 64 * 1024 * MB
# Modes converted row band by row band, so the conversion never holds more than one band's copy.
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
BAND_PIXELS = 1 << 16


@dataclass
class DecodedImage:
    format: str
    width: int
    height: int
    rgb: Image.Image


def format_bytes(size: int) -> str:
    return f"{size / (1024 * MB):.1f} GB" if size >= 1024 * MB else f"{size / MB:.0f} MB"


def check_decode_budget(budget_bytes: object) -> int:
    """The budget itself, when it is a whole number of bytes within the bounds Loupe accepts."""
    if (
        isinstance(budget_bytes, bool)
        or not isinstance(budget_bytes, int)
        or not MIN_DECODE_BUDGET_BYTES <= budget_bytes <= MAX_DECODE_BUDGET_BYTES
    ):
        raise LoupeError(
            f"A decode budget must be a whole number of bytes from {format_bytes(MIN_DECODE_BUDGET_BYTES)} "
            f"to {format_bytes(MAX_DECODE_BUDGET_BYTES)} (the default is {format_bytes(DEFAULT_DECODE_BUDGET_BYTES)})."
        )
    return budget_bytes


def decode_cost(mode: str, width: int, height: int) -> int:
    """The decoded frame's size in bytes: width x height x bands x bytes per sample ("I;16": 1 band
    of 2 bytes, "F": 1 of 4, RGBA: 4 of 1).

    The frame is what a hostile header controls; `to_rgb` converts it band by band into an 8-bit RGB
    copy no larger than the frame's pixels x 3, so decoding never holds much more than twice this.
    """
    spec = ImageMode.getmode(mode)
    return width * height * len(spec.bands) * np.dtype(spec.typestr).itemsize


def decode_image(data: bytes, *, budget_bytes: int = DEFAULT_DECODE_BUDGET_BYTES) -> DecodedImage:
    """Validate untrusted bytes as one image, oriented and in RGB; LoupeError says why not.

    The header is read first and the image refused, before any pixel is decoded, when decoding
    it would take more than `budget_bytes` (see `decode_cost`).
    """
    if not data:
        raise LoupeError("empty file")
    if len(data) > MAX_FILE_BYTES:
        raise LoupeError(f"file larger than {MAX_FILE_BYTES // MB} MB")
    with warnings.catch_warnings():
        # Pillow warns between MAX_IMAGE_PIXELS and twice that; the budget below is the finer rule there.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            # Only the allowed decoders ever see the bytes; opening reads the header alone.
            img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
            cost = decode_cost(img.mode, img.width, img.height)
            if cost > budget_bytes:
                raise LoupeError(
                    f"decoded size {format_bytes(cost)} exceeds this workspace's {format_bytes(budget_bytes)} "
                    f"budget ({img.width} x {img.height} pixels, mode {img.mode}): make the image smaller "
                    "or raise the workspace's decode budget"
                )
            image_format = FORMAT_ALIASES.get(img.format, img.format)
            ImageOps.exif_transpose(img, in_place=True)
            rgb = to_rgb(img)
        except LoupeError:
            raise
        except Image.DecompressionBombError as exc:
            raise LoupeError(f"too many pixels (possible decompression bomb): {exc}") from None
        except UnidentifiedImageError:
            raise LoupeError("not an image (content is not a supported image format)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise LoupeError(f"corrupt or truncated image: {exc}") from None
        # Decoders fed malformed files raise all sorts (struct.error, IndexError, ...): still one file's problem.
        except Exception as exc:  # noqa: BLE001
            raise LoupeError(f"corrupt image ({type(exc).__name__}: {exc})") from None
    return DecodedImage(format=image_format, width=rgb.width, height=rgb.height, rgb=rgb)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit scaled (not clipped), transparency flattened onto white.

    An image already in RGB is returned as is; others are converted band by band (see `decode_cost`).
    """
    if img.mode in HIGH_DEPTH_MODES:
        return _bands_to_rgb(img, _grey_scaler(img))
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        return _bands_to_rgb(img, _flatten_onto_white)
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def _bands_to_rgb(img: Image.Image, convert_band) -> Image.Image:
    rgb = Image.new("RGB", img.size)
    rows = max(1, BAND_PIXELS // max(1, img.width))
    for top in range(0, img.height, rows):
        band = img.crop((0, top, img.width, min(img.height, top + rows)))
        rgb.paste(convert_band(band), (0, top))
    return rgb


def _flatten_onto_white(band: Image.Image) -> Image.Image:
    rgba = band.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _grey_scaler(img: Image.Image):
    """Maps a band of a 16-bit, 32-bit integer or float image to 8-bit grey in RGB.

    Integers are read as 16-bit unless every value fits in 8 bits; floats span their own finite
    range. NaN and infinities (which only floats hold) go to the ends of that range.
    """
    low, high = _finite_range(img)
    if img.mode == "F":
        top = max(high - low, 1e-12)
    else:
        low, top = 0.0, 65535.0 if img.mode.startswith("I;16") or high > 255 else 255.0

    def scale(band: Image.Image) -> Image.Image:
        values = np.asarray(band, dtype=np.float64)
        if img.mode == "F":
            values = np.nan_to_num(values, nan=low, posinf=low + top, neginf=low)
        grey = np.clip((values - low) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")

    return scale


def _finite_range(img: Image.Image) -> tuple[float, float]:
    # Band by band: Pillow's getextrema neither skips NaN nor reads big-endian 16-bit.
    low, high = np.inf, -np.inf
    rows = max(1, BAND_PIXELS // max(1, img.width))
    for top in range(0, img.height, rows):
        values = np.asarray(img.crop((0, top, img.width, min(img.height, top + rows))))
        finite = values[np.isfinite(values)] if img.mode == "F" else values
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    return (low, high) if low <= high else (0.0, 0.0)


def read_image_file(path: str | Path) -> bytes:
    """A file's bytes, once it is known to be a regular file no larger than an image may be."""
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise LoupeError("not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise LoupeError(f"file larger than {MAX_FILE_BYTES // MB} MB")
        with path.open("rb") as f:
            # Read at most one byte past the limit: the file may have grown since stat.
            return f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise LoupeError("no such file") from None
    except OSError as exc:
        raise LoupeError(f"cannot read: {exc.strerror or type(exc).__name__}") from None


def open_image_rgb(path: str | Path, *, budget_bytes: int = DEFAULT_DECODE_BUDGET_BYTES) -> Image.Image:
    """A stored catalog image, decoded the same way it was when it was imported; errors name the file."""
    try:
        return decode_image(read_image_file(path), budget_bytes=budget_bytes).rgb
    except LoupeError as exc:
        raise LoupeError(f"{Path(path).name}: {exc}") from None


def thumbnail_jpeg(rgb: Image.Image, max_side: int = THUMB_SIZE) -> bytes:
    thumb = rgb.copy()
    thumb.thumbnail((max_side, max_side))
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=85)
    return out.getvalue()


def preview_jpeg(path: str | Path, max_side: int = 1024, *, budget_bytes: int = DEFAULT_DECODE_BUDGET_BYTES) -> bytes:
    """A stored image as a browser-friendly JPEG (any format, oriented, RGB), at most `max_side` pixels."""
    return thumbnail_jpeg(open_image_rgb(path, budget_bytes=budget_bytes), max_side)
