"""Image loading and preprocessing: any PIL-readable image -> f32[S, S, 3] in [-1, 1].

`open_image` is the one image opener of aki-jax (training records, benchmark items, preprocessing): it
decodes fully, refuses decompression bombs, converts to RGB, and raises `ImageError` naming the source.

The original (torchvision) pipeline is `Resize((S, S), BICUBIC, antialias=True)` on the PIL image,
`convert("RGB")`, `ToTensor()` (x / 255) and `Normalize(0.5, 0.5)`. For RGB (and RGBA, L) images this
module computes exactly that: PIL's bicubic resize (always antialiased), then (x / 255 - 0.5) / 0.5.

Deliberate improvements over the original, all before the resize:
  - EXIF orientation is applied (`ImageOps.exif_transpose`); the original ignores it.
  - Palette ("P") images are converted to RGB(A) first; PIL would otherwise resize them with NEAREST.
  - 16/32-bit integer and float images are mapped to 8 bits by their value range (PIL's RGB
    conversion would clip everything above 255 to white).
  - CMYK, YCbCr, LAB, HSV and 1-bit images are converted to RGB / L first.
RGBA keeps the original's behaviour: PIL resizes it with premultiplied alpha, then alpha is dropped.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

ImageLike = Image.Image | str | os.PathLike | bytes | np.ndarray


class ImageError(ValueError):
    """An image that cannot be opened or decoded (missing, corrupt, truncated, a decompression bomb).

    The one error every image reader of aki-jax raises; the message names the source.
    """


def open_image(image: ImageLike, *, name: str | None = None, keep_mode: bool = False) -> Image.Image:
    """The one image opener: a fully decoded PIL image, EXIF orientation applied, in RGB.

    image: a path, encoded bytes, a PIL image, or a uint8/uint16/float array (H, W[, C]).
    name: how errors name the source (default: the path, or "image bytes").
    keep_mode: leave the decoded mode (RGBA, palette, 16-bit, ...) for `preprocess_image`, which converts
        it faithfully (see the module docstring); otherwise the image is converted to RGB the same way.

    Raises ImageError naming the source for a missing or unreadable file, data that does not decode
    (a truncated file fails here, not later: the pixels are decoded now), and an image whose header
    declares more pixels than PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, refused
    above twice that) before anything is decoded.
    """
    if isinstance(image, np.ndarray):
        try:
            image = Image.fromarray(_array_to_uint8(image))
        except ValueError as e:
            raise ImageError(f"{name or 'image array'}: {e}") from None
    elif isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        is_bytes = isinstance(image, (bytes, bytearray, memoryview))
        name = name or ("image bytes" if is_bytes else str(image))
        try:
            with Image.open(io.BytesIO(image) if is_bytes else image) as opened:
                opened.load()  # Image.open reads the header only: truncated data fails here
                image = ImageOps.exif_transpose(opened)  # a transposed copy, or a plain copy
        except FileNotFoundError:
            raise ImageError(f"{name}: no such image file") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"{name}: refused as a decompression bomb ({e})") from None
        except Exception as e:  # noqa: BLE001 - corrupt data raises OSError, SyntaxError, struct.error, ...
            raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    elif isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
    else:
        raise TypeError(f"expected a PIL image, a path, bytes or a numpy array, got {type(image).__name__}")
    return image if keep_mode else _to_resizable(image).convert("RGB")


def load_image(image: ImageLike) -> Image.Image:
    """`open_image` keeping the decoded mode (what `preprocess_image` starts from)."""
    return open_image(image, keep_mode=True)


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    if array.dtype == np.uint16:
        return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    raise ValueError(f"unsupported image array dtype {array.dtype} (use uint8, uint16 or float in [0, 1])")


def _to_resizable(image: Image.Image) -> Image.Image:
    """Convert modes PIL cannot resize faithfully to RGB, RGBA or L (see the module docstring)."""
    mode = image.mode
    if mode in ("RGB", "RGBA", "L"):
        return image
    if mode in ("P", "PA"):
        return image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
    if mode == "LA":
        return image.convert("RGBA")
    if mode == "1":
        return image.convert("L")
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image).astype(np.float64)
        if mode == "F":
            top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        elif mode.startswith("I;16") or values.max(initial=0) > 255:
            top = 65535.0
        else:
            top = 255.0
        return Image.fromarray(np.round(np.clip(values / top, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, ...


def preprocess_image(image: ImageLike, size: int) -> np.ndarray:
    """One image -> f32[size, size, 3] in [-1, 1] (bicubic resize with antialias, mean/std 0.5)."""
    pil = _to_resizable(load_image(image))
    pil = pil.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
    pixels = np.asarray(pil, dtype=np.float32) / np.float32(255.0)
    return (pixels - np.float32(0.5)) / np.float32(0.5)


def preprocess_images(images: Sequence[ImageLike], size: int) -> np.ndarray:
    """Several images of one example -> f32[I, size, size, 3] (I may be 0)."""
    if not images:
        return np.zeros((0, size, size, 3), np.float32)
    return np.stack([preprocess_image(image, size) for image in images])
