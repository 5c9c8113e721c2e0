"""The original EAGLE-3 layout that SGLang serves (`--speculative-algorithm EAGLE3`) and SpecForge writes: one
flat Llama config.json (`architectures: [LlamaForCausalLMEagle3]`, `draft_vocab_size`, `target_hidden_size`,
`eagle_config.eagle_aux_hidden_state_layer_ids`) and weights named `midlayer.*`, `fc`, `norm`, `lm_head`, `d2t`,
`t2d`. The same network as the speculators layout (`vlmspec.drafters.speculators`), other names.

Facts read (not copied) from sgl-project/sglang: `python/sglang/srt/models/llama_eagle3.py` (the first layer's
residual is the raw hidden input, i.e. norm_before_residual=false; `midlayer`; d2t as offsets),
`python/sglang/srt/model_executor/model_runner.py` (the layer ids come from the draft config's `eagle_config`) and
`python/sglang/srt/models/llama.py` / `qwen2.py` (`set_eagle3_layers_to_capture` captures id + 1: an SGLang id
names the decoder layer whose output is tapped, i.e. our hidden-state index - 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmspec import __version__

if TYPE_CHECKING:
    from vlmspec.drafters.base import Drafter

ARCHITECTURE = "LlamaForCausalLMEagle3"


def save_sglang(drafter: "Drafter", directory: str | Path, verifier: str, speculative_tokens: int) -> Path:
    """Write `drafter` in SGLang's EAGLE-3 layout (`verifier` and `speculative_tokens` have no field there: SGLang
    takes the target and the draft length as server flags)."""
    import json

    from safetensors.torch import save_file

    from vlmspec.drafters.speculators import check_exportable, export_config, export_tensors

    check_exportable(drafter)
    if drafter.config.norm_before_residual:
        raise ValueError("cannot export to the sglang layout: SGLang's EAGLE-3 layer starts the residual from the "
                         "raw hidden input, this drafter from the normalised one (norm_before_residual=true); "
                         "use --format speculators (vLLM)")
    spec = export_config(drafter, verifier, speculative_tokens)
    config = {**spec["transformer_layer_config"], "architectures": [ARCHITECTURE],
              "draft_vocab_size": spec["draft_vocab_size"], "target_hidden_size": spec["target_hidden_size"],
              "eagle_config": {"use_aux_hidden_state": True,
                               "eagle_aux_hidden_state_layer_ids": [i - 1 for i in drafter.layers]},
              "dtype": spec["dtype"], "torch_dtype": spec["torch_dtype"], "vlmspec_version": __version__}
    tensors = {name.replace("layers.0.", "midlayer.", 1) if name.startswith("layers.0.") else name: tensor
               for name, tensor in export_tensors(drafter).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def is_sglang_config(config: Any) -> bool:
    return isinstance(config, dict) and ARCHITECTURE in (config.get("architectures") or [])


def as_speculators_config(config: dict[str, Any]) -> dict[str, Any]:
    """The speculators-layout config describing the same network as an SGLang / SpecForge EAGLE-3 config."""
    eagle = config.get("eagle_config") or {}
    if eagle.get("use_aux_hidden_state", True) is False:
        raise ValueError("this EAGLE-3 checkpoint does not fuse target layers (use_aux_hidden_state=false); "
                         "that variant is not implemented here")
    ids = eagle.get("eagle_aux_hidden_state_layer_ids")
    special = {"architectures", "draft_vocab_size", "target_hidden_size", "eagle_config", "norm_before_residual"}
    layer = {key: value for key, value in config.items() if key not in special}
    return {"speculators_model_type": "eagle3", "transformer_layer_config": {"model_type": "llama", **layer},
            "draft_vocab_size": config.get("draft_vocab_size"), "target_hidden_size": config.get("target_hidden_size"),
            "norm_before_residual": bool(config.get("norm_before_residual", False)),     # SGLang's residual
            "eagle_aux_hidden_state_layer_ids": [i + 1 for i in ids] if ids else None}
