"""The server's settings: every limit in one frozen dataclass, validated once (the CLI flags build it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20


@dataclass(frozen=True)
class ImageLimits:
    """What one request may send as images. `max_pixels` is checked from the image header before any pixel is
    decoded (no decompression bombs); `min_side` refuses images too small for an image processor to read."""

    max_images: int = 8
    max_image_bytes: int = 10 * MIB
    max_pixels: int = 4096 * 4096
    min_side: int = 2
    allowed_local_media_path: Path | None = None

    def __post_init__(self) -> None:
        for name in ("max_images", "max_image_bytes", "max_pixels", "min_side"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        root = self.allowed_local_media_path
        if root is not None:
            resolved = Path(root).expanduser().resolve()
            if not resolved.is_dir():
                raise ValueError(f"--allowed-local-media-path is not a directory: {root}")
            object.__setattr__(self, "allowed_local_media_path", resolved)


@dataclass(frozen=True)
class ServeConfig:
    """`model_name` is what /v1/models lists and requests must name. `api_key` None = no auth. `max_waiting`
    bounds the queue behind the engine's running rows (more: 503). `shutdown_grace_seconds`: how long running
    streams may go on after SIGTERM before they are cancelled."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 32 * MIB
    max_waiting: int = 256
    shutdown_grace_seconds: float = 10.0
    images: ImageLimits = ImageLimits()

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("the served model name is empty")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key is empty")
        for name in ("max_body_bytes", "max_waiting"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.shutdown_grace_seconds >= 0:
            raise ValueError(f"shutdown_grace_seconds must be >= 0, got {self.shutdown_grace_seconds!r}")
