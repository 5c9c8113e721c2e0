"""Request images: `data:` URLs and local files under the allowed root, decoded with every limit checked before
the pixels are. The server never fetches from the network: http(s) URLs are refused."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image, UnidentifiedImageError

from vlmspec.inputs import to_rgb
from vlmspec.serve.config import ImageLimits
from vlmspec.serve.errors import APIError

# PIL format name by accepted MIME type; Image.open is told to try only these decoders.
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}
ACCEPTED = "PNG, JPEG, WEBP or non-animated GIF"


def load_images(urls: list[str], limits: ImageLimits) -> list[Image.Image]:
    if len(urls) > limits.max_images:
        raise APIError(400, f"too many images: {len(urls)} image parts, the limit is {limits.max_images} per request",
                       param="messages")
    return [load_image_url(url, f"image {index + 1}", limits) for index, url in enumerate(urls)]


def load_image_url(url: str, where: str, limits: ImageLimits) -> Image.Image:
    """One `image_url` → an RGB image, or an APIError(400) saying what is wrong with it."""
    scheme = urlsplit(url).scheme.lower() if ":" in url[:12] else ""
    if scheme == "data":
        data, declared = decode_data_url(url, where, limits)
        return decode_image(data, where, limits, declared)
    if scheme in ("http", "https"):
        raise APIError(400, f"{where}: {scheme} image URLs are refused: this server never fetches from the network; "
                            f"send the image as a data: URL", param="messages")
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise APIError(400, f"{where}: file URL names another host ({parts.netloc})", param="messages")
        return decode_image(read_local_file(unquote(parts.path), where, limits), where, limits)
    if scheme:
        raise APIError(400, f"{where}: unsupported URL scheme {scheme!r}: use a data: URL", param="messages")
    return decode_image(read_local_file(url, where, limits), where, limits)


def decode_data_url(url: str, where: str, limits: ImageLimits) -> tuple[bytes, str]:
    """`data:image/png;base64,…` → (bytes, PIL format the MIME type declares)."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise APIError(400, f"{where}: malformed data URL (no ',' before the data)", param="messages")
    media, *options = header[len("data:"):].split(";")
    media = media.strip().lower()
    if "base64" not in options:
        raise APIError(400, f"{where}: data URL must be base64-encoded (data:{media or 'image/png'};base64,…)",
                       param="messages")
    if media not in FORMATS:
        raise APIError(400, f"{where}: unsupported media type {media or '(none)'!r}: send {ACCEPTED}",
                       param="messages")
    payload = "".join(payload.split())
    if len(payload) // 4 * 3 > limits.max_image_bytes + 2:          # before decoding: base64 is 4 chars per 3 bytes
        raise APIError(400, f"{where} is larger than the limit of {limits.max_image_bytes} bytes", param="messages")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the data URL's base64 is invalid", param="messages") from None
    return data, FORMATS[media]


def read_local_file(text: str, where: str, limits: ImageLimits) -> bytes:
    """A file under the allowed root (relative paths are relative to it). The path is resolved, symlinks included,
    before the check, so neither `..` nor a link leads out; outside paths are refused before existence is tested."""
    root = limits.allowed_local_media_path
    if root is None:
        raise APIError(400, f"{where}: local image files are not allowed (the server was started without "
                            f"--allowed-local-media-path); send a data: URL", param="messages")
    path = Path(text).expanduser()
    resolved = (path if path.is_absolute() else root / path).resolve()
    if not resolved.is_relative_to(root):
        raise APIError(400, f"{where}: {text} is outside the allowed local media path", param="messages")
    if not resolved.is_file():
        raise APIError(400, f"{where}: no such image file under the allowed local media path: {text}",
                       param="messages")
    if resolved.stat().st_size > limits.max_image_bytes:
        raise APIError(400, f"{where} is larger than the limit of {limits.max_image_bytes} bytes", param="messages")
    with resolved.open("rb") as file:                   # read at most the limit + 1: the file may have grown since
        data = file.read(limits.max_image_bytes + 1)
    if len(data) > limits.max_image_bytes:
        raise APIError(400, f"{where} is larger than the limit of {limits.max_image_bytes} bytes", param="messages")
    return data


def decode_image(data: bytes, where: str, limits: ImageLimits, declared: str | None = None) -> Image.Image:
    """Bytes → RGB image. Size, pixel count and animation are read from the header before any pixel is decoded
    (this request's limit, not PIL's process-wide one); then the pixels, where corruption and truncation show."""
    if not data:
        raise APIError(400, f"{where} is empty (0 bytes)", param="messages")
    if len(data) > limits.max_image_bytes:
        raise APIError(400, f"{where} is larger than the limit of {limits.max_image_bytes} bytes", param="messages")
    try:
        image = Image.open(io.BytesIO(data), formats=sorted(set(FORMATS.values())))
    except Image.DecompressionBombError:
        raise APIError(400, f"{where} claims more pixels than PIL opens at all (a decompression bomb); the limit "
                            f"here is {limits.max_pixels} pixels", param="messages") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise APIError(400, f"{where} is not a readable {ACCEPTED} image (unknown format or corrupt header)",
                       param="messages") from None
    # Not closed by a `with`: closing destroys the pixels of the image we return; a BytesIO holds no OS file.
    if declared is not None and image.format != declared:
        raise APIError(400, f"{where}: the data URL says {declared} but the data is {image.format}",
                       param="messages")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise APIError(400, f"{where} is {width}x{height} = {width * height} pixels, over the limit of "
                            f"{limits.max_pixels}", param="messages")
    if min(width, height) < limits.min_side:
        raise APIError(400, f"{where} is {width}x{height}: images must be at least {limits.min_side} pixels "
                            f"on each side", param="messages")
    if getattr(image, "is_animated", False):
        raise APIError(400, f"{where} is animated ({image.n_frames} frames): send a single frame",
                       param="messages")
    try:
        image.load()
        return to_rgb(image, where)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise APIError(400, f"{where} is corrupt or truncated: {error}", param="messages") from None
