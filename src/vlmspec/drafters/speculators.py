"""The EAGLE-3 layout of the `speculators` format (what vLLM loads): export an `eagle3` drafter of
`layout="speculators"`, and load such a checkpoint (from vlmspec, speculators, or SGLang's / SpecForge's own layout
via `vlmspec.drafters.sglang`) as one.

A checkpoint is a directory with `config.json` and `model.safetensors`. Facts read from the format's sources
(nothing copied; the tests cite the same files):

- vllm-project/speculators `src/speculators/models/eagle3/config.py` (`Eagle3SpeculatorConfig`: the fields below)
  and `src/speculators/config.py` (`SpeculatorsConfig`, `VerifierConfig`); `src/speculators/proposals/greedy.py`
  (the proposal method); `src/speculators/model.py` (`DraftVocabMixin`: `t2d` a bool mask over the target
  vocabulary, `d2t` int64 offsets, target id = draft id + d2t[draft id]); `src/speculators/models/eagle3/core.py`
  (weight names `fc`, `layers.0.*`, `norm`, `lm_head`, `embed_tokens`; `fc_norm` / `norm_before_fc` / `norm_output`).
- vllm-project/vllm `vllm/transformers_utils/configs/speculators/algos.py` (`update_eagle3`: a missing
  `norm_before_residual` reads as true there but false in speculators, so it is always written) and
  `vllm/model_executor/models/llama_eagle3.py` (an fc over exactly 3 target layers, `midlayer.` = `layers.0.`,
  the model owns `lm_head` over `draft_vocab_size` and may carry `embed_tokens`). The target layers are the
  residual stream entering decoder layer i (`aux_hidden_states.append(hidden_states + residual)` in vLLM's
  decoder loops), i.e. Hugging Face's `hidden_states[i]`, our hidden-state index i, for 1 <= i < num_layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vlmspec import __version__

if TYPE_CHECKING:
    from vlmspec.drafters.base import Drafter
    from vlmspec.drafters.eagle3 import Eagle3Drafter
    from vlmspec.target import Target


# What exporting each other drafter type would lose (the format has one EAGLE-3 layout, no image inputs).
REFUSALS = {
    "eagle": "an EAGLE-2 drafter (one feature layer, fc over [embedding ; feature], the target's lm_head) has no "
             "EAGLE-3 layout; train eagle3 with --drafter-option layout=speculators",
    "msd": "its image positions take the target's projected visual embeddings, which an EAGLE-3 draft never sees",
    "vispec": "its vision adaptor's image queries and the global image vector would be lost",
    "flash": "its compressed visual latents and its k-token semi-autoregressive head would be lost",
    "lumen": "its visual-input and global-image-vector terms and its per-layer fusion norms would be lost",
    "draft-model": "it is a separate small model, not an EAGLE-3 head (serve it as a draft model instead)",
    "prompt-lookup": "it has no weights (use the engine's own n-gram / prompt-lookup method)",
}
NAMES = (                               # our parameter prefix → the format's (hidden_norm before its layer)
    ("decoder.hidden_norm.", "layers.0.hidden_norm."),
    ("decoder.layer.", "layers.0."),
    ("decoder.norm.", "norm."),
    ("fuse.", "fc."),
    ("lm_head.", "lm_head."),
)
AUX_LAYERS = 3                          # vLLM's fc reads exactly three target layers


# ---------------------------------------------------------------------------------------------------- export
def refusal(drafter_type: str, layout: str | None) -> str | None:
    """Why a drafter of this type (and eagle3 layout) cannot be written as EAGLE-3, in one line; None if it can."""
    if drafter_type != "eagle3":
        reason = REFUSALS.get(drafter_type, "only EAGLE-3 drafters have an EAGLE-3 layout")
        return f"cannot export a {drafter_type} drafter as EAGLE-3: {reason}"
    if layout != "speculators":
        return ("cannot export this eagle3 drafter: its layout is 'fc' (fc over [embedding ; fused feature] before "
                "a standard layer, per-layer fusion norms), while EAGLE-3's layer reads [embedding ; hidden] 2H-wide "
                "from raw target layers; train with --drafter-option layout=speculators")
    return None


def check_exportable(drafter: "Drafter") -> None:
    """A one-line ValueError saying what the format cannot hold, unless `drafter` maps onto it exactly."""
    reason = refusal(drafter.drafter_type, getattr(drafter.config, "layout", None))
    if reason:
        raise ValueError(reason)
    layers, count = list(drafter.layers), drafter.target.num_layers
    if len(layers) != AUX_LAYERS or not all(1 <= layer < count for layer in layers):
        raise ValueError(f"cannot export: vLLM and SGLang fuse exactly {AUX_LAYERS} target layers with ids "
                         f"1 … {count - 1} (the input of decoder layer i); this drafter fuses {layers}")


def export_config(drafter: "Eagle3Drafter", verifier: str, speculative_tokens: int) -> dict[str, Any]:
    """The format's config.json for an exportable drafter (see `check_exportable`)."""
    target, layer = drafter.target, drafter.decoder.config
    rope = dict(layer.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    layer_config = {
        "model_type": "llama", "vocab_size": target.vocab_size, "hidden_size": layer.hidden_size,
        "intermediate_size": layer.intermediate_size, "num_hidden_layers": 1,
        "num_attention_heads": layer.num_attention_heads, "num_key_value_heads": layer.num_key_value_heads,
        "head_dim": layer.head_dim, "hidden_act": layer.hidden_act, "rms_norm_eps": layer.rms_norm_eps,
        "max_position_embeddings": layer.max_position_embeddings, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "rope_theta": rope.get("rope_theta", 10000.0), "rope_parameters": rope,
    }
    if rope.get("rope_type", "default") != "default":
        layer_config["rope_scaling"] = rope                 # the name older transformers (and vLLM with them) read
    greedy = {"proposal_type": "greedy", "speculative_tokens": speculative_tokens, "verifier_accept_k": 1,
              "accept_tolerance": 0.0}
    return {
        "architectures": ["Eagle3DraftModel"],            # what speculators' own save writes (engines ignore it)
        "speculators_model_type": "eagle3",
        "transformer_layer_config": layer_config,
        "draft_vocab_size": drafter.draft_ids.numel(),
        "target_hidden_size": target.hidden_size,
        "norm_before_residual": drafter.config.norm_before_residual,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "eagle_aux_hidden_state_layer_ids": list(drafter.layers),
        "speculators_config": {
            "algorithm": "eagle3", "proposal_methods": [greedy], "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier,
                         "architectures": list(getattr(target.config, "architectures", None) or [target.architecture])},
        },
        "dtype": str(drafter.fuse.weight.dtype).removeprefix("torch."),
        "torch_dtype": str(drafter.fuse.weight.dtype).removeprefix("torch."),   # the name before transformers 5
        "vlmspec_version": __version__,
    }


def export_tensors(drafter: "Eagle3Drafter") -> dict[str, Tensor]:
    """The format's weights: our parameters renamed, the target's embedding, d2t / t2d for a reduced vocabulary."""
    tensors = {}
    for name, tensor in drafter.state_dict().items():
        if name == "draft_ids":
            continue
        tensors[format_name(name)] = tensor
    tensors["embed_tokens.weight"] = drafter.target.embed_tokens.weight.to(drafter.fuse.weight.dtype)
    draft_ids, vocab = drafter.draft_ids.cpu(), drafter.target.vocab_size
    if draft_ids.numel() != vocab:
        tensors["d2t"] = draft_ids - torch.arange(draft_ids.numel())
        tensors["t2d"] = torch.zeros(vocab, dtype=torch.bool).index_fill(0, draft_ids, True)
    return {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}


def format_name(name: str) -> str:
    for ours, theirs in NAMES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise ValueError(f"parameter {name!r} has no name in the speculators format")


def save_speculators(drafter: "Drafter", directory: str | Path, verifier: str, speculative_tokens: int) -> Path:
    """Write `drafter` as a speculators EAGLE-3 checkpoint (refused with a one-line error if it does not map)."""
    from safetensors.torch import save_file

    check_exportable(drafter)
    if speculative_tokens < 1:
        raise ValueError(f"speculative tokens must be >= 1, got {speculative_tokens}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(export_tensors(drafter), str(directory / "model.safetensors"))
    config = export_config(drafter, verifier, speculative_tokens)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


# ---------------------------------------------------------------------------------------------------- import
def read_config(directory: Path) -> dict[str, Any] | None:
    """The config of a speculators checkpoint directory (an SGLang / SpecForge EAGLE-3 one translated to it, see
    `vlmspec.drafters.sglang`), None for anything else."""
    from vlmspec.drafters.sglang import as_speculators_config, is_sglang_config

    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if is_sglang_config(config):
        return as_speculators_config(config)
    return config if isinstance(config, dict) and "speculators_model_type" in config else None


def speculative_tokens(directory: Path) -> int | None:
    """The draft length the checkpoint proposes (its first proposal method), if it says."""
    methods = ((read_config(directory) or {}).get("speculators_config") or {}).get("proposal_methods") or [{}]
    tokens = methods[0].get("speculative_tokens")
    return tokens if isinstance(tokens, int) and tokens >= 1 else None


def load_speculators(directory: Path, target: "Target") -> "Eagle3Drafter":
    """A speculators EAGLE-3 checkpoint → an `eagle3` drafter of layout=speculators that computes what vLLM would."""
    from safetensors.torch import load_file

    from vlmspec.drafters.eagle3 import Eagle3Config, Eagle3Drafter

    config = read_config(directory)
    if config is None or config.get("speculators_model_type") != "eagle3":
        kind = (config or {}).get("speculators_model_type")
        raise ValueError(f"{directory} is a speculators {kind!r} checkpoint; only eagle3 loads as a vlmspec drafter")
    eagle3 = Eagle3Config(**import_options(config, target))
    tensors = load_file(str(Path(directory) / "model.safetensors"))
    check_embedding(tensors.pop("embed_tokens.weight", None), target, directory)
    d2t, t2d = tensors.pop("d2t", None), tensors.pop("t2d", None)
    drafter = Eagle3Drafter(target, eagle3)
    state = {our_name(name): tensor for name, tensor in tensors.items()}
    state["draft_ids"] = draft_ids(d2t, t2d, eagle3.draft_vocab or target.vocab_size, target.vocab_size)
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"speculators checkpoint {directory} does not match an EAGLE-3 Llama layer: missing "
                         f"{sorted(missing)}, unexpected {sorted(unexpected)}")
    return drafter.to(device=target.device, dtype=target.dtype).eval()


def import_options(config: dict[str, Any], target: "Target") -> dict[str, Any]:
    """Eagle3Config options of a speculators EAGLE-3 config; a ValueError for anything our layer would compute
    differently from vLLM's."""
    from transformers import LlamaConfig

    raw = config.get("transformer_layer_config") or {}
    if raw.get("model_type") != "llama":
        raise ValueError(f"cannot load this EAGLE-3 checkpoint: its layer is {raw.get('model_type')!r}, only llama "
                         "layers are implemented here")
    # speculators writes the layer config as a diff against the class defaults: resolve them as it reads them
    layer = LlamaConfig(**{key: value for key, value in raw.items() if key != "model_type"})
    text = target.text_config
    expected = {"num_hidden_layers": 1, "hidden_size": target.hidden_size, "vocab_size": target.vocab_size,
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                "rms_norm_eps": getattr(text, "rms_norm_eps", 1e-6),
                "head_dim": target.hidden_size // layer.num_attention_heads}
    for key, value in expected.items():
        if getattr(layer, key, None) != value:
            raise ValueError(f"cannot load this EAGLE-3 checkpoint for {target.architecture}: its layer has "
                             f"{key}={getattr(layer, key, None)!r}, this implementation needs {value!r}")
    for flag in ("norm_before_fc", "fc_norm", "norm_output"):
        if config.get(flag):
            raise ValueError(f"cannot load this EAGLE-3 checkpoint: {flag}=true is not implemented here")
    if "norm_before_residual" not in config:
        raise ValueError("the checkpoint's config has no norm_before_residual (speculators reads it as false, vLLM "
                         "as true): write it explicitly")
    if config.get("target_hidden_size") not in (None, target.hidden_size):
        raise ValueError(f"the checkpoint is for a target of hidden size {config['target_hidden_size']}, this "
                         f"target's is {target.hidden_size}")
    ours, theirs = dict(getattr(text, "rope_parameters", None) or {}), dict(layer.rope_parameters or {})
    if theirs.get("rope_theta") != ours.get("rope_theta") or \
            theirs.get("rope_type", "default") != ours.get("rope_type", "default"):
        raise ValueError(f"the checkpoint's rotary embedding {theirs} differs from the target's {ours}")
    count = target.num_layers
    layers = config.get("eagle_aux_hidden_state_layer_ids") or [2, count // 2, count - 3]   # vLLM's default
    if not all(isinstance(i, int) and 1 <= i < count for i in layers):
        raise ValueError(f"the checkpoint's target layer ids {layers} are not all in 1 … {count - 1}")
    draft_vocab = config.get("draft_vocab_size") or target.vocab_size
    return {"layers": tuple(layers), "num_heads": layer.num_attention_heads, "layout": "speculators",
            "intermediate_size": layer.intermediate_size, "num_kv_heads": layer.num_key_value_heads,
            "norm_before_residual": bool(config["norm_before_residual"]),
            "draft_vocab": 0 if draft_vocab == target.vocab_size else draft_vocab}


def our_name(name: str) -> str:
    name = name.replace("midlayer.", "layers.0.", 1) if name.startswith("midlayer.") else name   # EAGLE-3's own
    for ours, theirs in NAMES:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return name                                       # reported as unexpected by the caller


def check_embedding(embedding: Tensor | None, target: "Target", directory: Path) -> None:
    """Our drafter embeds with the target's table: a checkpoint's own must be that table."""
    if embedding is None:
        return
    ours = target.embed_tokens.weight.detach().cpu().to(embedding.dtype)
    if embedding.shape != ours.shape or not torch.equal(embedding, ours):
        raise ValueError(f"{directory} carries an embedding table that differs from the target's; vlmspec's eagle3 "
                         "embeds with the target's own")


def draft_ids(d2t: Tensor | None, t2d: Tensor | None, draft_vocab: int, vocab: int) -> Tensor:
    """Target id of each draft id (d2t holds offsets: target id = draft id + d2t); checked against t2d."""
    if d2t is None:
        if draft_vocab != vocab:
            raise ValueError(f"draft_vocab_size {draft_vocab} < the target's {vocab} but the checkpoint has no d2t")
        return torch.arange(vocab)
    ids = torch.arange(d2t.numel()) + d2t.long()
    if d2t.numel() != draft_vocab or ids.min() < 0 or ids.max() >= vocab or ids.unique().numel() != ids.numel():
        raise ValueError(f"the checkpoint's d2t does not map {draft_vocab} draft ids to distinct target ids")
    if t2d is not None and not torch.equal(t2d.bool().nonzero().flatten(), ids.sort().values):
        raise ValueError("the checkpoint's t2d and d2t name different draft vocabularies")
    return ids
