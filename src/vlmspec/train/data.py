"""Collected data for training: lazy shard reading, right-padded `TrainBatch`es, and a resumable batch stream
with the MSD curriculum (text-only samples first, then a linear ramp of the multimodal share)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from vlmspec.train.batch import TrainBatch


@dataclass(frozen=True)
class SampleRef:
    folder: int      # index into the data folders
    shard: Path
    slot: int        # j in the shard's "<j>/…" keys
    length: int
    has_image: bool


class CollectedData:
    """The samples of one or more `vlmspec collect` folders, holding (at least) `layers`."""

    def __init__(self, folders: Sequence[str | Path], layers: Sequence[int], target=None):
        from safetensors import safe_open

        self.layers = sorted(set(layers))
        self.samples: list[SampleRef] = []
        self.identities = []
        if not folders:
            raise ValueError("no data folders given")
        for number, folder in enumerate(Path(f) for f in folders):
            meta_path = folder / "collect.json"
            if not meta_path.is_file():
                raise ValueError(f"{folder} is not a collected data folder (no collect.json); run `vlmspec collect`")
            meta = json.loads(meta_path.read_text())
            missing = sorted(set(self.layers) - set(meta["layers"]))
            if missing:
                raise ValueError(f"{folder} lacks hidden-state layer(s) {missing} that this drafter needs "
                                 f"(it has {meta['layers']}); collect again with --layers or --drafters")
            if target is not None:
                check_target(meta["target"], target, folder)
            self.identities.append(meta)
            for shard in sorted(folder.glob("shard-*.safetensors")):
                with safe_open(str(shard), "pt") as handle:
                    count = len(json.loads(handle.metadata()["ids"]))
                    for slot in range(count):
                        image_mask = handle.get_tensor(f"{slot}/image_mask")
                        self.samples.append(SampleRef(number, shard, slot, image_mask.shape[0],
                                                      bool(image_mask.any())))
        if not self.samples:
            raise ValueError(f"no collected samples in {', '.join(map(str, folders))}")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        ref = self.samples[index]
        with safe_open(str(ref.shard), "pt") as handle:
            keys = ["input_ids", "loss_mask", "image_mask", "positions"] + [f"hidden/{l}" for l in self.layers]
            return {key: handle.get_tensor(f"{ref.slot}/{key}") for key in keys}

    def answer_token_counts(self, vocab_size: int) -> torch.Tensor:
        """How often each token id occurs at trained (loss-mask) positions over all samples: [vocab_size] int64."""
        from safetensors import safe_open

        counts = torch.zeros(vocab_size, dtype=torch.long)
        for ref in self.samples:
            with safe_open(str(ref.shard), "pt") as handle:
                ids = handle.get_tensor(f"{ref.slot}/input_ids").long()
                mask = handle.get_tensor(f"{ref.slot}/loss_mask").bool()
            counts += torch.bincount(ids[mask], minlength=vocab_size)[:vocab_size]
        return counts

    def batch(self, indices: Sequence[int], dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> TrainBatch:
        """Right-padded batch of samples `indices`, hidden states cast to `dtype`."""
        from vlmspec.target.base import image_spans

        items = [self.load(i) for i in indices]
        length = max(item["input_ids"].shape[0] for item in items)

        def pad(key: str, value=0) -> torch.Tensor:
            rows = []
            for item in items:
                tensor = item[key]
                extra = length - tensor.shape[-1 if key == "positions" else 0]
                if key == "positions":                                   # [S] or [3, S]
                    rows.append(torch.nn.functional.pad(tensor, (0, extra), value=value))
                else:
                    rows.append(torch.cat([tensor, tensor.new_full((extra, *tensor.shape[1:]), value)]))
            return torch.stack(rows, dim=1 if key == "positions" and items[0][key].dim() == 2 else 0)

        image_mask = pad("image_mask").bool()
        attention = torch.zeros(len(items), length, dtype=torch.bool)
        for row, item in enumerate(items):
            attention[row, : item["input_ids"].shape[0]] = True
        return TrainBatch(input_ids=pad("input_ids").long().to(device), attention_mask=attention.to(device),
                          loss_mask=pad("loss_mask").bool().to(device),
                          hidden_states={l: pad(f"hidden/{l}").to(device=device, dtype=dtype) for l in self.layers},
                          image_mask=image_mask.to(device), image_spans=image_spans(image_mask),
                          positions=pad("positions").long().to(device))


def check_target(identity: dict, target, folder: Path) -> None:
    for key in ("architecture", "hidden_size", "vocab_size", "num_layers"):
        actual = getattr(target, key)
        if identity.get(key) != actual:
            raise ValueError(f"{folder} was collected from a target with {key}={identity.get(key)}, "
                             f"but this target has {key}={actual}")
    if identity.get("fingerprint") != target.fingerprint():
        warnings.warn(f"{folder} was collected from a different version of this target (fingerprint mismatch)",
                      stacklevel=3)


@dataclass(frozen=True)
class Curriculum:
    """MSD's two stages: `text_first` steps of text-only samples, then `ramp` steps over which the multimodal
    share rises linearly from 0 to its natural share in the data; after that, the data's own mix."""

    text_first: int = 0
    ramp: int = 0

    @classmethod
    def parse(cls, text: str | None) -> "Curriculum":
        """`text-first:STEPS,ramp:STEPS` (either part optional); empty → no curriculum."""
        values = {"text-first": 0, "ramp": 0}
        for item in (text or "").split(","):
            if not item.strip():
                continue
            key, sep, value = item.strip().partition(":")
            if not sep or key not in values or not value.isdigit():
                raise ValueError(f"bad curriculum stage {item!r}; expected text-first:STEPS,ramp:STEPS")
            values[key] = int(value)
        return cls(values["text-first"], values["ramp"])

    @property
    def active(self) -> bool:
        return self.text_first > 0 or self.ramp > 0

    def multimodal_share(self, step: int, natural: float) -> float:
        if step < self.text_first:
            return 0.0
        if step < self.text_first + self.ramp:
            return natural * (step - self.text_first + 1) / self.ramp
        return natural


class BatchStream:
    """Which samples form the batch of each step. Each pool (all samples; or text-only / multimodal under a
    curriculum) is read in a seeded random order, epoch after epoch; the pool of each slot is drawn from a
    generator seeded by (seed, step). `state_dict` (the samples consumed per pool) is the data position."""

    def __init__(self, data: CollectedData, batch_size: int, seed: int, curriculum: Curriculum = Curriculum()):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.curriculum = batch_size, seed, curriculum
        if curriculum.active:
            self.pools = {"text": [i for i, s in enumerate(data.samples) if not s.has_image],
                          "image": [i for i, s in enumerate(data.samples) if s.has_image]}
            if not self.pools["text"] or not self.pools["image"]:
                warnings.warn("the curriculum needs both text-only and multimodal samples; training on the data's "
                              "own mix", stacklevel=2)
                self.pools = {"all": list(range(len(data)))}
        else:
            self.pools = {"all": list(range(len(data)))}
        self.natural = len(self.pools.get("image", [])) / len(data)
        self.consumed = {name: 0 for name in self.pools}

    def state_dict(self) -> dict[str, int]:
        return dict(self.consumed)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = {name: int(state.get(name, 0)) for name in self.pools}

    def _next(self, pool: str) -> int:
        members = self.pools[pool]
        epoch, position = divmod(self.consumed[pool], len(members))
        generator = torch.Generator().manual_seed(hash_seed(self.seed, pool, epoch))
        self.consumed[pool] += 1
        return members[int(torch.randperm(len(members), generator=generator)[position])]

    def next_batch(self, step: int) -> list[int]:
        if "all" in self.pools:
            return [self._next("all") for _ in range(self.batch_size)]
        share = self.curriculum.multimodal_share(step, self.natural)
        draws = torch.rand(self.batch_size, generator=torch.Generator().manual_seed(hash_seed(self.seed, "mix", step)))
        return [self._next("image" if float(u) < share else "text") for u in draws]


def hash_seed(*parts) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little")
