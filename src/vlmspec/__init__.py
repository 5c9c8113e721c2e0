"""vlmspec: lossless speculative decoding for Hugging Face vision-language models."""

__version__ = "0.1.0"

from vlmspec.drafters import available_drafters, build_drafter, load_drafter, save_drafter  # noqa: E402
from vlmspec.engine import Engine, GenerationResult, GenerationStats, Generator  # noqa: E402
from vlmspec.request import Chunk, Request, RequestCancelled  # noqa: E402
from vlmspec.target import Target  # noqa: E402
from vlmspec.tree import TreeConfig  # noqa: E402

__all__ = ["Chunk", "Engine", "GenerationResult", "Request", "RequestCancelled", "GenerationStats", "Generator", "Target", "TreeConfig", "__version__",
           "available_drafters", "build_drafter", "load_drafter", "save_drafter"]
