"""Target adapters: the unmodified HF model behind prefill / extend / verify / commit."""

from vlmspec.target.base import NodesOutput, PrefillOutput, Target, TargetState

__all__ = ["NodesOutput", "PrefillOutput", "Target", "TargetState"]
