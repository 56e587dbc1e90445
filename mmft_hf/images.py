"""Image decoding and RGB conversion shared by every stage: what the captioner sees, what the model trains on and
what the classifier is given are the same pixels.

`mmft_hf.classification.remote_pipeline` keeps an identical copy of `to_rgb` (a Hub file must be self-contained);
`tests/test_images.py` keeps the two equal.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Errors PIL raises for unreadable, truncated or unsupported files (SyntaxError comes from some legacy plugins).
IMAGE_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def _scale_to_uint8(image: Image.Image) -> Image.Image:
    """Maps a 16/32-bit integer or float single-channel image to 8-bit "L" instead of clipping at 255."""
    array = np.asarray(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and array.size and array.max() > 255):
        array = np.clip(array.astype(np.float64), 0, 65535) / 257.0  # 16-bit range -> 8-bit range
    elif image.mode == "F" and array.size and np.nanmax(array) <= 1.0:
        array = array.astype(np.float64) * 255.0  # float images in [0, 1]
    array = np.nan_to_num(np.clip(np.rint(array), 0, 255))
    return Image.fromarray(array.astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL image to 3-channel 8-bit RGB, the same way for training and for this pipeline.

    - Images with transparency (RGBA, LA, PA, and P or L/RGB images with a `transparency` entry) are composited
      onto a **white** background, as transformers' image processors do (`convert_to_rgb`). A plain
      `convert("RGB")` would expose whatever colour hides under transparent pixels, often black.
    - 16-bit ("I;16", "I") and float ("F") images are rescaled to 8 bits (16-bit range divided by 257, floats in
      [0, 1] multiplied by 255); PIL's own conversion clips them at 255, turning most 16-bit images white.
    - Everything else (L, 1, CMYK, YCbCr, LAB, HSV, P without transparency) uses PIL's `convert("RGB")`.

    Args:
        image (`PIL.Image.Image`): the image.

    Returns:
        `PIL.Image.Image`: an RGB image of the same size (`image` itself when it already is RGB).
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _scale_to_uint8(image).convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(value) -> Image.Image:
    """Decodes an image column value: a PIL image, a path, or a `datasets.Image(decode=False)` dict.

    Files are decoded eagerly (`Image.load()`), so a corrupt or truncated file fails here rather than later, and
    EXIF orientation is applied as `datasets.Image` does when it decodes.

    Args:
        value (`PIL.Image.Image`, `str`, `os.PathLike` or `dict`): the value; a dict has `bytes` and/or `path`.

    Returns:
        `PIL.Image.Image`: the decoded image.

    Raises:
        `ValueError`: for an empty file or a value of another type; PIL's own errors for undecodable files.
    """
    if isinstance(value, Image.Image):
        value.load()  # lazily opened images decode here
        return value
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and path is None:
            raise ValueError("the image value has neither 'bytes' nor 'path'.")
        if data is not None:
            if len(data) == 0:
                raise ValueError("the image bytes are empty (0 bytes).")
            source = io.BytesIO(data)
        else:
            source = path
    elif isinstance(value, (str, os.PathLike)):
        source = value
    else:
        raise ValueError(f"expected a PIL image, a path or a dict with 'bytes'/'path', got {type(value).__name__}.")
    if not isinstance(source, io.BytesIO) and os.path.isfile(source) and os.path.getsize(source) == 0:
        raise ValueError(f"the image file {os.fspath(source)!r} is empty (0 bytes).")
    image = Image.open(source)
    image.load()
    if image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
        image = ImageOps.exif_transpose(image)
    return image


def describe_image_source(value) -> str:
    """A short description of where an image came from (its file path when known), for error messages."""
    path = None
    if isinstance(value, dict):
        path = value.get("path")
    elif isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
    elif isinstance(value, Image.Image):
        path = getattr(value, "filename", None) or None
    return f" (file {path!r})" if path else ""
