"""LLaVA-NeXT (LLaVA-1.6): any-resolution tiling over the unmodified HF model.

Each image is resized to the best-fitting grid resolution of `image_grid_pinpoints`, cut into tiles plus a
downscaled overview, and the processor expands the image marker to the number of features that survive unpadding
(plus one newline feature per row), so the image-token count varies with the image's size and aspect ratio. The
processor returns `image_sizes` beside `pixel_values` ([images, tiles, C, H, W], padded to the most tiles); the
default `Family.encode` passes both to the model, which needs `image_sizes` to unpad. Positions are 1-D, so the
default position hooks apply. The PIL image processor (`LlavaNextImageProcessorPil`) is chosen by the auto classes
when torchvision is absent; no video processor is involved.
"""

from __future__ import annotations

from vlmspec.target.families import Family, register_family


@register_family
class LlavaNextFamily(Family):
    architectures = ("LlavaNextForConditionalGeneration",)
