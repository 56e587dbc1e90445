"""Helpers shared by the caption backends: image preparation on the way in, text clean-up on the way out."""

from __future__ import annotations

import base64
import io
import re

from PIL import Image

from ...images import to_rgb

# A reasoning model may emit its chain of thought before the answer; an unclosed block (output cut off by the
# token limit) runs to the end of the text, so nothing of it can leak into a caption.
_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|\Z)", flags=re.DOTALL | re.IGNORECASE)
_STRAY_CLOSE = re.compile(r"^.*?</think>", flags=re.DOTALL | re.IGNORECASE)


def strip_thinking(text: str) -> str:
    """Removes `<think>...</think>` blocks and surrounding whitespace from a model answer.

    Some chat templates open the thinking block in the prompt, so the answer starts inside it and only the closing
    tag appears: everything up to a leading `</think>` is removed too.

    Args:
        text (`str`): the raw model output.

    Returns:
        `str`: the answer without thinking blocks, stripped (possibly empty).
    """
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text.lower():
        text = _STRAY_CLOSE.sub("", text, count=1)
    return text.strip()


def prepare_image(image: Image.Image, max_image_side: int | None) -> Image.Image:
    """Converts an image to RGB and downscales it so that its longer side is at most `max_image_side`.

    The conversion is [`mmft_hf.images.to_rgb`], the one training uses: transparent pixels are composited onto white
    (a plain `convert("RGB")` turns them black, which changes what a captioner sees), 16-bit and float images are
    rescaled to 8 bits (not clipped to white), and grayscale, palette and CMYK images are converted. Images are
    never upscaled.

    Args:
        image (`PIL.Image.Image`): the input image, any mode.
        max_image_side (`int`, *optional*): the longest side allowed, in pixels; `None` keeps the size.

    Returns:
        `PIL.Image.Image`: an RGB image with its pixels loaded (a new object, so an unreadable file fails here; the
        input is left untouched).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a PIL.Image.Image, got {type(image).__name__}; decode the image column first.")
    if max_image_side is not None and max_image_side < 1:
        raise ValueError(f"max_image_side must be a positive number of pixels or None, got {max_image_side}.")
    rgb = to_rgb(image)
    if rgb is image:  # already RGB: `to_rgb` hands the input back
        rgb = image.copy()
    if max_image_side is not None:
        width, height = rgb.size
        longest = max(width, height)
        if longest > max_image_side:
            scale = max_image_side / longest
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            rgb = rgb.resize(size, Image.BICUBIC, reducing_gap=3.0)
    return rgb


def image_to_data_url(image: Image.Image, image_format: str = "JPEG", quality: int = 90) -> str:
    """Encodes an RGB image as a base64 `data:` URL, the form chat-completions APIs accept inline.

    Args:
        image (`PIL.Image.Image`): an RGB image (see [`prepare_image`]).
        image_format (`str`, defaults to `"JPEG"`): `"JPEG"` (smaller uploads) or `"PNG"` (lossless).
        quality (`int`, defaults to 90): JPEG quality; ignored for PNG.

    Returns:
        `str`: `data:image/jpeg;base64,...` or `data:image/png;base64,...`.
    """
    image_format = image_format.upper()
    buffer = io.BytesIO()
    if image_format == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    elif image_format == "PNG":
        image.save(buffer, format="PNG")
    else:
        raise ValueError(f"image_format must be 'JPEG' or 'PNG', got {image_format!r}.")
    return f"data:image/{image_format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
