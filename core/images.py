"""The one place untrusted bytes become pixels: import, thumbnails, training, Grad-CAM, export and
prediction all decode through `decode_image`, so a photo looks the same to every stage.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import LoupeError

# Pillow's format name -> the extension the original bytes are stored under.
ALLOWED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif", "GIF": "gif"}
# Many cameras and phones write MPO: a JPEG with further pictures appended. Its first picture is the photo.
FORMAT_ALIASES = {"MPO": "JPEG"}
MAX_FILE_BYTES = 200 * 1024 * 1024
THUMB_SIZE = 256


@dataclass
class DecodedImage:
    format: str
    width: int
    height: int
    rgb: Image.Image


def decode_image(data: bytes) -> DecodedImage:
    """Validate untrusted bytes as one image, oriented and in RGB; LoupeError says why not."""
    if not data:
        raise LoupeError("empty file")
    if len(data) > MAX_FILE_BYTES:
        raise LoupeError(f"file larger than {MAX_FILE_BYTES // 2**20} MB")
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a bomb is a bomb.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # Only the allowed decoders ever see the bytes.
            img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
            img.load()
            oriented = ImageOps.exif_transpose(img)
            rgb = to_rgb(oriented)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise LoupeError(f"too many pixels (possible decompression bomb): {exc}") from None
        except UnidentifiedImageError:
            raise LoupeError("not an image (content is not a supported image format)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise LoupeError(f"corrupt or truncated image: {exc}") from None
        # Decoders fed malformed files raise all sorts (struct.error, IndexError, ...): still one file's problem.
        except Exception as exc:  # noqa: BLE001
            raise LoupeError(f"corrupt image ({type(exc).__name__}: {exc})") from None
    image_format = FORMAT_ALIASES.get(img.format, img.format)
    return DecodedImage(format=image_format, width=rgb.width, height=rgb.height, rgb=rgb)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit scaled (not clipped), transparency flattened onto white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
        if img.mode == "F":
            low, top = values.min(), max(values.max(), values.min() + 1e-12)
            values = values - low
            top = top - low
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image_rgb(path: str | Path) -> Image.Image:
    """A stored catalog image, decoded the same way it was when it was imported."""
    return decode_image(Path(path).read_bytes()).rgb


def thumbnail_jpeg(rgb: Image.Image, max_side: int = THUMB_SIZE) -> bytes:
    thumb = rgb.copy()
    thumb.thumbnail((max_side, max_side))
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=85)
    return out.getvalue()


def preview_jpeg(path: str | Path, max_side: int = 1024) -> bytes:
    """A stored image as a browser-friendly JPEG (any format, oriented, RGB), at most `max_side` pixels."""
    return thumbnail_jpeg(open_image_rgb(path), max_side)
