"""`vlmspec collect`: run the target once per sample and store what drafter training needs.

Per sample: the token ids of prompt + answer, the loss mask (t where token t+1 is an answer token), the image mask,
the target's positions ([S], or all three M-RoPE axes [3, S] for Qwen2-VL), and the hidden states of the requested
layers (bf16). The answer is the suite's `reference` (teacher forcing) or, with `regenerate`, the target's own
greedy answer written by the engine's `Generator` (ViSpec: train on what the target says, optionally asked for
long answers with a prompt suffix). The generator may carry a trained drafter to write the answers faster:
speculative decoding is lossless, so the answers are the target's own (in fp32 exactly; in bf16 a near-tie may
round the other way, as for any bf16 run).

Layout of the output folder:

    collect.json                 settings + target identity (a resumed run must match them)
    shard-00000.safetensors      samples [0, shard_size): keys "<j>/input_ids", "<j>/loss_mask", "<j>/image_mask",
    shard-00001.safetensors      "<j>/positions", "<j>/hidden/<layer>"; metadata "ids" (JSON list)
    suites/…                     testbed suites generated for `--suites`

Shards are written atomically; a rerun skips finished shards (resumable).

Under a launcher (`torchrun --nproc-per-node N`, see `train/distributed.py`) rank r collects shards r, r + N,
r + 2N, … of the same list, so N processes write exactly the files one process writes, and a run resumes on any N.
Rank 0 writes `collect.json` and shows the progress bar (of its own shards). Ranks do not wait for each other at the
end (a long wait would hit the process group's timeout): the folder is complete when the launcher returns.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from vlmspec.bench.suites import SuiteSample
from vlmspec.engine import Generator
from vlmspec.target import Target
from vlmspec.train import distributed
from vlmspec.verify import SamplingConfig

COLLECT_VERSION = 1


@dataclass
class CollectConfig:
    layers: list[int]                      # non-negative hidden-state indices to store
    regenerate: bool = False               # the target writes the answers itself
    long_answer_suffix: str = ""           # appended to the prompt when regenerating
    max_new_tokens: int = 256              # regenerated answer budget
    shard_size: int = 32
    sources: list[str] = field(default_factory=list)

    def identity(self, target: Target, count: int) -> dict[str, Any]:
        return {"version": COLLECT_VERSION, "target": {"architecture": target.architecture,
                "fingerprint": target.fingerprint(), "hidden_size": target.hidden_size,
                "num_layers": target.num_layers, "vocab_size": target.vocab_size},
                "layers": sorted(set(self.layers)), "regenerate": self.regenerate,
                "long_answer_suffix": self.long_answer_suffix, "max_new_tokens": self.max_new_tokens,
                "shard_size": self.shard_size, "samples": count, "sources": self.sources}


def with_suffix(sample: SuiteSample, suffix: str) -> SuiteSample:
    """The sample with `suffix` appended to its (last) user text."""
    if not suffix:
        return sample
    if sample.prompt is not None:
        return replace(sample, prompt=sample.prompt + " " + suffix)
    messages = json.loads(json.dumps(sample.messages))
    last = messages[-1]
    if isinstance(last["content"], str):
        last["content"] = last["content"] + " " + suffix
    else:
        last["content"].append({"type": "text", "text": " " + suffix})
    return replace(sample, messages=messages)


def answer_ids(target: Target, sample: SuiteSample, inputs: dict[str, Tensor], config: CollectConfig,
               generator: Generator | None = None) -> list[int]:
    """Reference answer as the target was trained to see it (" answer" + eos), or the target's own greedy answer
    (written by `generator`, default plain decoding)."""
    if config.regenerate:
        generator = generator or Generator(target)
        *_, result = generator.stream_inputs(inputs, config.max_new_tokens, SamplingConfig(), seed=0)
        return result.token_ids
    if not sample.reference:
        raise ValueError(f"sample {sample.id!r} has no reference answer; collect it with --regenerate")
    tokenizer = target.tokenizer
    ids = tokenizer(" " + sample.reference, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return ids + ([eos] if eos is not None else [])


def extend_inputs(inputs: dict[str, Tensor], answer: Tensor) -> dict[str, Tensor]:
    """Append answer ids [1, A] to the encoded prompt. Per-token inputs of the prompt's shape follow: the
    attention mask with ones, anything else (e.g. Qwen2-VL's `mm_token_type_ids`) with zeros (= text)."""
    prompt_ids = inputs["input_ids"]
    full = dict(inputs)
    for key, value in inputs.items():
        if isinstance(value, Tensor) and value.shape == prompt_ids.shape:
            if key == "input_ids":
                fill = answer
            else:
                fill = torch.ones_like(answer) if key == "attention_mask" else torch.zeros_like(answer)
            full[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
    return full


def collect_sample(target: Target, sample: SuiteSample, config: CollectConfig,
                   generator: Generator | None = None) -> dict[str, Tensor]:
    """One sample's tensors (see the module docstring); keys without the "<j>/" prefix."""
    if config.regenerate:
        sample = with_suffix(sample, config.long_answer_suffix)
    inputs = target.encode(list(sample.images), sample.prompt, sample.messages)
    prompt_length = inputs["input_ids"].shape[1]
    answer = answer_ids(target, sample, inputs, config, generator)
    answer = answer[: max(0, target.context_length - prompt_length)]
    if not answer:
        raise ValueError(f"sample {sample.id!r}: no room for an answer in the target's context")
    extra = torch.tensor([answer], dtype=inputs["input_ids"].dtype, device=target.device)
    full = extend_inputs(inputs, extra)
    _, prefill = target.prefill(full)
    length = full["input_ids"].shape[1]
    loss_mask = torch.zeros(length, dtype=torch.uint8)
    loss_mask[prompt_length - 1 : length - 1] = 1                                        # predicts an answer token
    out = {"input_ids": full["input_ids"][0].to(torch.int32).cpu(), "loss_mask": loss_mask,
           "image_mask": prefill.image_mask[0].to(torch.uint8).cpu(),
           "positions": prefill.positions[..., 0, :].to(torch.int32).cpu()}                # [S] or [3, S]
    for layer in sorted(set(config.layers)):
        out[f"hidden/{layer}"] = prefill.hidden_states[layer][0].to(torch.bfloat16).cpu()   # [S, H]
    return out


def collect(target: Target, samples: Sequence[SuiteSample], out: str | Path, config: CollectConfig,
            progress: bool = True, generator: Generator | None = None) -> Path:
    """Collect `samples` into `out` (resumable: finished shards are kept). Returns `out`. `generator` (over
    `target`) writes regenerated answers; default: plain decoding."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out = Path(out)
    if not samples:
        raise ValueError("no samples to collect")
    for layer in config.layers:
        if not 0 <= layer <= target.num_layers:
            raise ValueError(f"layer {layer} is out of range: the target has hidden states 0 … {target.num_layers}")
    out.mkdir(parents=True, exist_ok=True)
    identity = config.identity(target, len(samples))
    distributed.on_main(lambda: write_identity(out, identity))
    rank = distributed.current()
    shards = [samples[i : i + config.shard_size] for i in range(0, len(samples), config.shard_size)]
    mine = list(range(rank.rank, len(shards), rank.world))                     # this rank's shard indices
    done = sum(len(shards[k]) for k in mine if shard_path(out, k).exists())
    bar = tqdm(total=sum(len(shards[k]) for k in mine), initial=done, unit="sample",
               desc="collect" if not rank.active else f"collect (rank 0 of {rank.world})",
               disable=not (progress and rank.main))
    for index in mine:
        shard = shards[index]
        path = shard_path(out, index)
        if path.exists():
            continue
        tensors: dict[str, Tensor] = {}
        for j, sample in enumerate(shard):
            for key, value in collect_sample(target, sample, config, generator).items():
                tensors[f"{j}/{key}"] = value.contiguous()
            bar.update(1)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"ids": json.dumps([s.id for s in shard]),
                                               "categories": json.dumps([s.category for s in shard])})
        os.replace(tmp, path)
    bar.close()
    return out


def write_identity(out: Path, identity: dict[str, Any]) -> None:
    """Write `collect.json`, or check that the folder's matches (a resumed run must use the same settings)."""
    meta_path = out / "collect.json"
    if meta_path.exists():
        previous = json.loads(meta_path.read_text())
        if previous != identity:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise ValueError(f"{out} holds a different collection (differs in {', '.join(changed)}); "
                             "use a new --out folder")
    else:
        meta_path.write_text(json.dumps(identity, indent=2) + "\n")


def shard_path(out: Path, index: int) -> Path:
    return out / f"shard-{index:05d}.safetensors"
