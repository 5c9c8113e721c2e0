"""The drafter interface, the registry, and drafter checkpoints.

A drafter proposes a tree of likely next tokens; it never decides what is emitted (verification does). Decode-time
protocol, driven by the engine with explicit state objects:

    state = drafter.begin(target, prefill, first_token)    # after the target's prefill
    loop:
        tree = drafter.propose(state, tree_config, scores)   # root = last verified token
        ... target verifies, commits the accepted path ...
        drafter.accept(state, tree, path, verified, bonus)  # path: accepted tree node indices, root first

A step may skip drafting (the engine verifies the root alone when drafting would not pay): then `accept` follows
`accept` with no `propose` between them, and the drafter must keep every verified token it has not consumed yet.

A drafter registers itself with `@register_drafter` under its type name with its config dataclass; the CLI, the
checkpoint loader and the tests read the registry.

Training protocol (driven by `vlmspec.train.trainer`; see `vlmspec.train.losses` for the alignment and options):

    layers = drafter.feature_layers()            # target hidden-state indices to collect (0 = input embeddings)
    loss, metrics = drafter.training_loss(batch, loss_config)     # batch: TrainBatch holding those layers
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vlmspec import __version__

if TYPE_CHECKING:
    from torch import Tensor

    from vlmspec.target import NodesOutput, PrefillOutput, Target
    from vlmspec.train.batch import TrainBatch
    from vlmspec.train.data import CollectedData
    from vlmspec.train.losses import LossConfig
    from vlmspec.tree import Tree, TreeBuilder, TreeConfig
    from vlmspec.verify import ChildScores

_REGISTRY: dict[str, type["Drafter"]] = {}


@dataclass
class DraftState:
    """Per-generation drafter state; subclasses add their caches. `forwards` counts draft model forwards."""

    forwards: int = 0


class DraftBatch:
    """The draft states of a batch's rows, in row order (`add` appends a new row; `remove` moves the last row into
    the freed place, as the target's cache does). This default drafts each row on its own; drafters whose rows can
    share forwards override it (`feature.FeatureDraftBatch`)."""

    def __init__(self, drafter: "Drafter"):
        self.drafter = drafter
        self.states: list[Any] = []

    def add(self, state: Any) -> None:
        self.states.append(state)

    def remove(self, row: int) -> None:
        self.states[row] = self.states[-1]
        self.states.pop()

    def propose(self, tree_configs: "list[TreeConfig | None]", scores: "list[ChildScores]") -> "list[Tree | None]":
        """Each row's tree (None where its config is None: that row does not draft this step)."""
        return [None if config is None else self.drafter.propose(state, config, row_scores)
                for state, config, row_scores in zip(self.states, tree_configs, scores)]


def register_drafter(cls: type["Drafter"]) -> type["Drafter"]:
    _REGISTRY[cls.drafter_type] = cls
    return cls


def available_drafters() -> list[str]:
    """Registered drafter type names."""
    import vlmspec.drafters  # noqa: F401  (importing the package registers the built-in drafters)

    return sorted(_REGISTRY)


def drafter_class(drafter_type: str) -> type["Drafter"]:
    names = available_drafters()
    if drafter_type not in _REGISTRY:
        raise ValueError(f"unknown drafter type {drafter_type!r}; available: {', '.join(names)}")
    return _REGISTRY[drafter_type]


class Drafter(nn.Module):
    """Base class. Subclasses set `drafter_type` and `config_class` (a frozen dataclass) and implement the protocol.

    Target modules a drafter reuses (embeddings, lm_head) are reached through `self.target`, which is not a
    submodule: they are neither trained nor saved with the drafter."""

    drafter_type: ClassVar[str]
    config_class: ClassVar[type]
    trainable: ClassVar[bool] = True

    def __init__(self, target: "Target", config: Any):
        super().__init__()
        self.config = config
        self._target_ref = [target]   # a list keeps the target out of the module tree

    @property
    def target(self) -> "Target":
        return self._target_ref[0]

    def begin(self, target: "Target", prefill: "PrefillOutput", first_token: int) -> Any:
        raise NotImplementedError

    def propose(self, state: Any, tree_config: "TreeConfig", scores: "ChildScores") -> "Tree":
        """One step's tree. `scores(logits, depth)` turns the draft logits [F, V] after frontier nodes of tree depth
        `depth` into what their children are chosen by (`TreeBuilder.expand`): the request's own choice rule
        (`Request.child_scores`), so the draft guesses the token the target will take."""
        raise NotImplementedError

    def accept(self, state: Any, tree: "Tree", path: list[int], verified: "NodesOutput", bonus: int) -> None:
        raise NotImplementedError

    def new_batch(self) -> "DraftBatch":
        """The container of this drafter's states for a batch of rows (the engine keeps it in row order)."""
        return DraftBatch(self)

    def tree_builder(self, tree_config: "TreeConfig", root_token: int) -> "TreeBuilder":
        """The builder of one step's draft tree, the target's EOS tokens as leaves."""
        from vlmspec.tree import TreeBuilder

        return TreeBuilder(tree_config, root_token, leaves=self.target.eos_token_ids)

    # ------------------------------------------------------------------ training
    def feature_layers(self) -> list[int]:
        """Target hidden-state indices this drafter needs at collect/train time, sorted, non-negative: 0 = the input
        embeddings (projected visual embeddings included), `target.num_layers` = the last (post-norm) state. A
        trainable drafter always lists `num_layers` (the loss targets are built from it). Default: none."""
        return []

    def prepare_training(self, data: "CollectedData") -> None:
        """Called once on a freshly built drafter with its training data, before the first step (e.g. to choose a
        draft vocabulary from token frequencies). Default: nothing."""

    def default_loss_config(self) -> "LossConfig":
        """The loss options this design is trained with unless the user overrides them (`--loss`)."""
        from vlmspec.train.losses import LossConfig

        return LossConfig()

    def training_loss(self, batch: "TrainBatch", config: "LossConfig") -> tuple["Tensor", dict[str, float]]:
        """Scalar loss of one batch (differentiable w.r.t. this drafter's parameters only) and float metrics: at
        least `loss` and the per-depth draft top-1 accuracy `acc@1` … `acc@{config.steps}`. `batch.hidden_states`
        holds (at least) `feature_layers()`, cast to the drafter's dtype. Called in train mode, possibly under
        autocast; randomness must come from torch's global generator (the trainer checkpoints it)."""
        raise ValueError(f"drafter type {self.drafter_type!r} is not trainable")

    def resolve_layer(self, layer: int) -> int:
        """A hidden-state index, negative counting from the end (-1 = the last), as a non-negative index."""
        count = self.target.num_layers + 1
        if not -count <= layer < count:
            raise ValueError(f"layer {layer} is out of range for a target with {self.target.num_layers} layers "
                             f"(hidden-state indices 0 … {count - 1})")
        return layer % count

    def target_info(self) -> dict[str, Any]:
        return {"architecture": self.target.architecture, "vocab_size": self.target.vocab_size,
                "hidden_size": self.target.hidden_size, "fingerprint": self.target.fingerprint()}


def build_drafter(drafter_type: str, target: "Target", seed: int = 0, **config: Any) -> Drafter:
    """An untrained drafter of `drafter_type` for `target` (weights from `seed`, fp32 cast to the target's dtype)."""
    cls = drafter_class(drafter_type)
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"unknown {drafter_type} option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    torch.manual_seed(seed)
    drafter = cls(target, cls.config_class(**config))
    return drafter.to(device=target.device, dtype=target.dtype).eval()


def save_drafter(drafter: Drafter, directory: str | Path, tree: "TreeConfig | None" = None) -> Path:
    """Write `model.safetensors` and `config.json` (type, config, target identity, recommended tree, version)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"drafter_type": drafter.drafter_type, "config": dataclasses.asdict(drafter.config),
            "target": drafter.target_info(), "tree": tree.to_dict() if tree is not None else None,
            "vlmspec_version": __version__}
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in drafter.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_drafter_meta(directory: Path) -> dict[str, Any]:
    try:
        meta = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{directory} is not a drafter checkpoint: {error}") from None
    if "drafter_type" not in meta:
        raise ValueError(f"{directory / 'config.json'} has no drafter_type: not a vlmspec drafter checkpoint")
    return meta


def load_drafter(name_or_dir: str | Path, target: "Target") -> Drafter:
    """Load a checkpoint directory, or `testbed:<type>` (a shipped trained drafter). A directory in the
    `speculators` format's EAGLE-3 layout (vLLM's) loads as an `eagle3` drafter (`vlmspec.drafters.speculators`)."""
    from safetensors.torch import load_file

    from vlmspec.drafters import speculators

    directory = resolve_drafter_path(name_or_dir)
    if speculators.read_config(directory) is not None:
        return speculators.load_speculators(directory, target)
    meta = read_drafter_meta(directory)
    cls = drafter_class(meta["drafter_type"])
    expected = meta.get("target", {})
    actual = {"architecture": target.architecture, "vocab_size": target.vocab_size, "hidden_size": target.hidden_size}
    for key, value in actual.items():
        if key in expected and expected[key] != value:
            raise ValueError(f"drafter {directory} was trained for a target with {key}={expected[key]}, "
                             f"but this target has {key}={value}")
    if expected.get("fingerprint") not in (None, target.fingerprint()):
        warnings.warn(f"drafter {directory} was trained on a different version of this target "
                      "(fingerprint mismatch): it will stay lossless but may accept fewer tokens", stacklevel=2)
    config = cls.config_class(**meta.get("config", {}))
    drafter = cls(target, config)
    if cls.trainable:
        state = load_file(str(directory / "model.safetensors"))
        missing, unexpected = drafter.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"drafter checkpoint {directory} does not match its config: missing {missing}, "
                             f"unexpected {unexpected}")
    return drafter.to(device=target.device, dtype=target.dtype).eval()


def recommended_tree(name_or_dir: str | Path) -> "TreeConfig | None":
    from vlmspec.drafters import speculators
    from vlmspec.tree import TreeConfig

    directory = resolve_drafter_path(name_or_dir)
    if speculators.read_config(directory) is not None:                 # the format proposes a chain of k tokens
        tokens = speculators.speculative_tokens(directory)
        return TreeConfig(kind="chain", depth=tokens) if tokens else None
    tree = read_drafter_meta(directory).get("tree")
    return TreeConfig.from_dict(tree) if tree else None


def resolve_drafter_path(name_or_dir: str | Path) -> Path:
    """An existing path always means the path; `testbed:<type>` means the shipped drafter of that type."""
    path = Path(name_or_dir)
    if path.exists():
        return path
    text = str(name_or_dir)
    if text.startswith("testbed:"):
        from vlmspec.testbed import SHIPPED_DRAFTERS_DIR

        shipped = SHIPPED_DRAFTERS_DIR / text.split(":", 1)[1]
        if not (shipped / "config.json").is_file():
            raise ValueError(f"no shipped drafter {text!r} (looked in {shipped})")
        return shipped
    raise ValueError(f"drafter {text!r} is not a checkpoint directory, a registered type or testbed:<type>")
