"""User inputs at the boundary: images (paths or PIL) and prompts (a string with `<image>` markers, or HF chat
messages). Everything here raises a clear `ValueError`; nothing deeper sees a bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from PIL import Image, UnidentifiedImageError

IMAGE_MARKER = "<image>"
Messages = list[dict[str, Any]]


def load_image(image: Image.Image | str | Path) -> Image.Image:
    """Return an RGB image. Converts palette, grayscale, CMYK, 16-bit and alpha images (alpha is composited on
    white); refuses missing, empty, corrupt and zero-size files."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image not found: {path}")
        if path.stat().st_size == 0:
            raise ValueError(f"image file is empty: {path}")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"cannot read image {path}: {error}") from None
        name = str(path)
    elif isinstance(image, Image.Image):
        name = "image"
    else:
        raise ValueError(f"an image must be a PIL.Image or a path, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{name} has zero size ({image.width}x{image.height})")
    return to_rgb(image, name)


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Convert any PIL mode that has a faithful RGB rendering; refuse the rest."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: rescale to 8 bits by the image's own range.
        low, high = image.getextrema()
        scale = 255.0 / max(1, high - low)
        return image.point(lambda value: (value - low) * scale).convert("L").convert("RGB")
    if mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV", "F"):
        return image.convert("RGB")
    raise ValueError(f"{name}: unsupported image mode {mode!r}")


def prompt_to_messages(prompt: str, num_images: int) -> Messages:
    """A prompt string → one user turn. `<image>` marks where each image goes; with no marker, images come first."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty")
    pieces = prompt.split(IMAGE_MARKER)
    markers = len(pieces) - 1
    if markers == 0:
        pieces = [""] * num_images + [prompt]
        markers = num_images
    if markers > num_images:
        raise ValueError(f"the prompt has {markers} {IMAGE_MARKER} markers but {num_images} image(s) were given")
    if markers < num_images:
        raise ValueError(f"{num_images} images were given but the prompt has only {markers} {IMAGE_MARKER} markers")
    content: list[dict[str, Any]] = []
    for index, piece in enumerate(pieces):
        if index > 0:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return [{"role": "user", "content": content}]


def count_images(messages: Messages) -> int:
    """Validate HF chat messages and count their image parts."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': …, 'content': …} dicts")
    count = 0
    has_text = False
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"bad message {message!r}: expected a dict with 'role' and 'content'")
        content = message["content"]
        if isinstance(content, str):
            has_text = has_text or bool(content.strip())
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                count += 1
            elif kind == "text":
                has_text = has_text or bool(str(part.get("text", "")).strip())
            else:
                raise ValueError(f"bad message part {part!r}: expected type 'image' or 'text'")
    if not has_text and count == 0:
        raise ValueError("the prompt is empty")
    return count


def resolve_prompt(images: Sequence[Image.Image | str | Path] | None, prompt: str | None,
                   messages: Messages | None) -> tuple[list[Image.Image], Messages]:
    """Load the images and turn `prompt` or `messages` into validated chat messages."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt= or messages=")
    loaded = [load_image(image) for image in (images or [])]
    if messages is None:
        messages = prompt_to_messages(prompt, len(loaded))
    else:
        wanted = count_images(messages)
        if wanted != len(loaded):
            raise ValueError(f"the messages have {wanted} image part(s) but {len(loaded)} image(s) were given")
    return loaded, messages
