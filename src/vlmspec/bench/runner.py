"""The bench loop: per sample, every arm back to back on the same encoded inputs, records appended per sample.

Arms: plain decoding (`none`, always first: the speedup and divergence reference), each `--drafters` entry through
the same `Generator` loop, and each peer through `model.generate` (see `peers`). A sample's records (all arms × all
temperatures) are written and flushed together, so a killed run keeps whole samples and `--resume` skips them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vlmspec.bench import costs as cost_model
from vlmspec.bench import metrics
from vlmspec.bench.grounding import grounded_mask, ground_truth_words
from vlmspec.bench.peers import Peer, open_peer
from vlmspec.bench.suites import SuiteSample, load_suites
from vlmspec.engine import GenerationResult, Generator
from vlmspec.hardware import native_bf16
from vlmspec.runtime import check_tree, open_drafter, resolve_tree, tree_picker
from vlmspec.target import Target
from vlmspec.target.families import resolve_dtype
from vlmspec.verify import SamplingConfig

# config keys that must match for --resume to append to an existing run
RESUME_KEYS = ("target", "dtype", "max_new_tokens", "tree", "trees", "seed", "device", "drafter_options")
# on_text(arm, sample, temperature, piece): streamed text of every arm; piece "" marks the start of an arm's run
TextCallback = Callable[[str, SuiteSample, float, str], None]


@dataclass(frozen=True)
class BenchConfig:
    """Everything a bench run depends on; written to summary.json as the resolved config."""

    target: str = "testbed"
    drafters: tuple[str, ...] = ("none",)
    suites: tuple[str, ...] = ()
    suite_files: tuple[str, ...] = ()
    temperatures: tuple[float, ...] = (0.0,)
    max_new_tokens: int = 64
    dtype: str | None = "fast"                  # resolved for `device` (vlmspec.hardware); None: the checkpoint's
    tree: str | None = None
    trees: tuple[str, ...] = ()                 # each drafter arm once per tree, named "DRAFTER [TREE]"
    out: str = "bench-out"
    resume: bool = False
    limit: int | None = None
    warmup: int = 1
    seed: int = 0
    peers: tuple[str, ...] = ()
    device: str = "cpu"
    drafter_options: tuple[str, ...] = ()       # "ARM:KEY=VALUE", e.g. "draft-model:model=DIR", "eagle:tree=…"
    cost_repeats: int = 11
    plots: bool = True
    concurrency: tuple[int, ...] = ()           # a throughput sweep through the batched engine (`throughput`)

    def __post_init__(self) -> None:
        if not self.suites and not self.suite_files:
            raise ValueError("no suites: give --suites NAME[,NAME…] or --suite-file FILE")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be >= 0, got {list(self.temperatures)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.warmup < 0 or self.cost_repeats < 1:
            raise ValueError("warmup must be >= 0 and cost_repeats >= 1")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        resolve_dtype(self.dtype)                   # a bad name fails here, before any model loads
        if len(set(self.drafters)) != len(self.drafters) or len(set(self.peers)) != len(self.peers):
            raise ValueError("an arm is listed twice in --drafters or --peers")
        if self.tree:
            check_tree(self.tree)
        for tree in self.trees:
            check_tree(tree)
        if self.trees and self.tree or len(set(self.trees)) != len(self.trees):
            raise ValueError("give one --tree or distinct --trees, not both")
        if any(not isinstance(c, int) or c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency levels must be integers >= 1, got {list(self.concurrency)}")
        if self.concurrency and (self.peers or self.trees or self.resume):
            raise ValueError("--concurrency runs plain and drafter arms through the batched engine: no --peers, "
                             "--trees or --resume")
        for option in self.drafter_options:
            arm = next((a for a in self.drafters if option.startswith(a + ":")), None)
            if arm is None:
                raise ValueError(f"drafter option {option!r} names no arm of --drafters (expected ARM:KEY=VALUE)")
            if option[len(arm) + 1:].startswith("tree="):
                if self.trees:
                    raise ValueError(f"drafter option {option!r}: an arm's own tree and --trees exclude each other")
                check_tree(option[len(arm) + 1 + len("tree="):])

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class Arm:
    name: str
    kind: str                                  # "vlmspec" or "peer"
    generator: Generator | None = None
    peer: Peer | None = None
    tree: dict | None = None                   # the resolved tree of a drafter arm

    def run(self, inputs: dict, max_new_tokens: int, temperature: float, seed: int,
            on_piece: Callable[[str], None] | None = None) -> dict[str, Any]:
        if self.peer is not None:
            return self.peer.run(inputs, max_new_tokens, temperature, seed)
        result = None
        for item in self.generator.stream_inputs(inputs, max_new_tokens, SamplingConfig(temperature=temperature),
                                                 seed):
            if isinstance(item, GenerationResult):
                result = item
            elif on_piece is not None:
                on_piece(item)
        stats = result.stats
        return {"status": "ok", "error": None, "token_ids": result.token_ids, "new_tokens": stats.new_tokens,
                "target_forwards": stats.target_forwards, "seconds": stats.seconds,
                "prefill_seconds": stats.prefill_seconds, "decode_seconds": stats.decode_seconds,
                "draft_seconds": stats.draft_seconds, "verify_seconds": stats.verify_seconds,
                "accepted_per_step": stats.accepted_per_step, "draft_forwards_per_step": stats.draft_forwards_per_step,
                "token_sources": stats.token_sources,
                "tree_nodes_per_step": stats.tree_nodes_per_step, "tree_depth_per_step": stats.tree_depth_per_step}


def open_target(config: BenchConfig) -> Target:
    target = Target.from_pretrained(config.target, dtype=resolve_dtype(config.dtype, config.device))
    if config.device != "cpu":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {config.device}: CUDA is not available in this torch build")
        target.model.to(config.device)
    return target


def tree_arm_name(drafter: str, tree: str) -> str:
    """The arm name of `drafter` under one of `--trees`."""
    return f"{drafter} [{tree}]"


def open_arms(config: BenchConfig, target: Target) -> list[Arm]:
    """Plain decoding first, then each drafter, then each peer. An arm's tree: its own `ARM:tree=…` option, else
    `--tree`, else `runtime.resolve_tree`'s default (`auto` for a checkpoint); with `--trees`, one arm per drafter and
    tree (one drafter object: its state lives in each generation, not in it)."""
    arms = [Arm("none", "vlmspec", Generator(target, None), tree=None)]
    for name in config.drafters:
        if name == "none":
            continue
        options = [o[len(name) + 1:] for o in config.drafter_options if o.startswith(name + ":")]
        own_tree = [o[len("tree="):] for o in options if o.startswith("tree=")]
        drafter, recommended = open_drafter(name, target, [o for o in options if not o.startswith("tree=")])
        for text in config.trees or [(own_tree or [config.tree])[-1]]:
            resolved = resolve_tree(text, target, name, drafter, recommended)
            arm_name = tree_arm_name(name, text) if config.trees else name
            generator = Generator(target, drafter, resolved, pick_tree=tree_picker(text, target, name, drafter))
            arms.append(Arm(arm_name, "vlmspec", generator, tree=resolved.to_dict()))
    arms += [Arm(peer.name, "peer", peer=peer) for peer in (open_peer(spec, target) for spec in config.peers)]
    return arms


def sample_seed(seed: int, sample: SuiteSample, temperature: float) -> int:
    """One seed per sample × temperature, shared by all arms."""
    return zlib.crc32(f"{seed}:{sample.suite}:{sample.id}:{temperature}".encode())


def encode(target: Target, sample: SuiteSample) -> dict:
    return target.encode(list(sample.images), prompt=sample.prompt, messages=sample.messages)


def read_records(path: Path) -> list[dict]:
    """Records of a (possibly killed) run; a torn last line is dropped."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def prepare_out(config: BenchConfig, out: Path, keys_per_sample: set[tuple[str, float]]) -> list[dict]:
    """Check the output folder; on --resume keep only the records of complete samples and return them."""
    out.mkdir(parents=True, exist_ok=True)
    records_path, config_path = out / "records.jsonl", out / "config.json"
    if records_path.exists() and not config.resume:
        raise ValueError(f"{records_path} exists: pass --resume to continue that run, or choose another --out")
    kept: list[dict] = []
    if config.resume and config_path.exists():
        previous = json.loads(config_path.read_text())
        previous.setdefault("trees", [])           # runs from before --trees ran none
        changed = [k for k in RESUME_KEYS if previous.get(k) != config.to_dict().get(k)]
        if changed:
            raise ValueError(f"cannot resume {out}: {', '.join(changed)} differ from that run's config")
    if config.resume:
        by_sample: dict[tuple[str, str], list[dict]] = {}
        for record in read_records(records_path):
            by_sample.setdefault((record["suite"], record["id"]), []).append(record)
        for records in by_sample.values():
            if {(r["arm"], float(r["temperature"])) for r in records} >= keys_per_sample:
                kept += records
        records_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    config_path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return kept


def run_bench(config: BenchConfig, progress: bool = True, on_text: TextCallback | None = None) -> Path:
    """Run the bench and write records.jsonl, summary.json, report.md and plots into `config.out` (with
    `concurrency`: the throughput sweep of `vlmspec.bench.throughput`)."""
    from tqdm import tqdm

    if config.concurrency:
        from vlmspec.bench.throughput import run_throughput

        return run_throughput(config, progress)

    suites = load_suites(list(config.suites), list(config.suite_files))
    if config.limit:
        suites = {name: samples[: config.limit] for name, samples in suites.items()}
    target = open_target(config)
    arms = open_arms(config, target)
    temperatures = [float(t) for t in config.temperatures]
    keys = {(arm.name, t) for arm in arms for t in temperatures}
    out = Path(config.out)
    records = prepare_out(config, out, keys)
    done = {(r["suite"], r["id"]) for r in records}
    samples = [s for group in suites.values() for s in group]

    if config.warmup and any((s.suite, s.id) not in done for s in samples):
        warm_inputs = encode(target, samples[0])
        for arm in arms:
            for _ in range(config.warmup):
                arm.run(warm_inputs, config.max_new_tokens, 0.0, config.seed)     # full length: every cache size

    with open(out / "records.jsonl", "a") as handle, \
            tqdm(total=len(samples), desc="bench", unit="sample", disable=not progress, file=sys.stderr) as bar:
        for sample in samples:
            bar.set_postfix_str(f"{sample.suite}/{sample.id}", refresh=False)
            if (sample.suite, sample.id) not in done:
                lines = run_sample(arms, target, sample, temperatures, config, on_text)
                handle.write("".join(json.dumps(line) + "\n" for line in lines))
                handle.flush()
                os.fsync(handle.fileno())
                records += lines
            bar.update(1)

    costs = measure_suite_costs(target, suites, records, config.cost_repeats)
    summary = build_summary(config, arms, records, costs, target)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    from vlmspec.bench.report import write_report

    write_report(summary, out, plots=config.plots)
    return out


def run_sample(arms: list[Arm], target: Target, sample: SuiteSample, temperatures: list[float],
               config: BenchConfig, on_text: TextCallback | None) -> list[dict]:
    """All arms × temperatures on one sample; plain decoding first, so each record can name its divergence."""
    inputs = encode(target, sample)
    words = ground_truth_words(sample.reference, bool(sample.images))
    lines = []
    for temperature in temperatures:
        seed = sample_seed(config.seed, sample, temperature)
        plain_tokens = None
        for arm in arms:
            on_piece = None
            if on_text is not None:
                on_piece = lambda piece, arm=arm: on_text(arm.name, sample, temperature, piece)  # noqa: E731
                on_piece("")
            result = arm.run(inputs, config.max_new_tokens, temperature, seed, on_piece)
            if arm.name == "none":
                plain_tokens = result["token_ids"]
            # plain and our arms choose every token by the same seeded rule (`verify.Sampler`), so their outputs
            # match at any temperature; peers sample with their own random streams
            comparable = (result["status"] == "ok" and plain_tokens is not None
                          and (temperature == 0 or arm.kind == "vlmspec"))
            divergence = metrics.first_divergence(result["token_ids"], plain_tokens) if comparable else None
            grounded = grounded_mask(target.tokenizer, result["token_ids"], words) \
                if words and result["status"] == "ok" else None
            lines.append({"suite": sample.suite, "id": sample.id, "category": sample.category, "arm": arm.name,
                          "kind": arm.kind, "temperature": temperature, "seed": seed,
                          "prompt_tokens": int(inputs["input_ids"].shape[1]), **result,
                          "diverged": (divergence is not None) if comparable else None,
                          "first_divergence": divergence, "grounded": grounded})
    return lines


def measure_suite_costs(target: Target, suites: dict[str, list[SuiteSample]], records: list[dict],
                        repeats: int) -> dict[str, dict[str, Any]]:
    """c(k) per suite at the sample whose prompt length is the suite's median, for k up to its largest tree."""
    results: dict[str, dict[str, Any]] = {}
    cache: dict[tuple[int, int], dict[int, float]] = {}
    for name, samples in suites.items():
        ids = {s.id for s in samples}
        mine = [r for r in records if r["suite"] == name and r["id"] in ids]
        lengths = {r["id"]: r["prompt_tokens"] for r in mine}
        if not lengths:
            continue
        median = statistics.median_low(lengths.values())
        sample = next(s for s in samples if lengths.get(s.id) == median)
        largest = max((n for r in mine for n in (r.get("tree_nodes_per_step") or [])), default=1)
        grid = cost_model.cost_grid(largest)
        key = (median, grid[-1])
        if key not in cache:
            cache[key] = cost_model.measure_costs(target, encode(target, sample), grid, repeats=repeats)
        results[name] = {"prompt_tokens": median, "seconds": {str(k): v for k, v in cache[key].items()}}
    return results


def environment(target: Target) -> dict[str, Any]:
    import transformers

    from vlmspec import __version__

    device = target.device
    return {"versions": {"vlmspec": __version__, "python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "device": str(device), "native_bf16": native_bf16(device),
                        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                        "tf32": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None}}


def build_summary(config: BenchConfig, arms: list[Arm], records: list[dict], costs: dict[str, dict[str, Any]],
                  target: Target) -> dict[str, Any]:
    numeric = {suite: {int(k): v for k, v in entry["seconds"].items()} for suite, entry in costs.items()}
    summary = metrics.summarize(records, numeric)
    return {"config": config.to_dict(),
            "target": {"name": config.target, "architecture": target.architecture, "dtype": str(target.dtype),
                       "fingerprint": target.fingerprint()},
            "arms": [{"name": arm.name, "kind": arm.kind, "tree": arm.tree} for arm in arms],
            "conventions": {"tau": "new tokens / target forwards, prefill included (DESIGN); plain = 1",
                            "tau_minus_1_per_step": "(new tokens − target forwards) / (target forwards − 1): mean "
                                                    "draft tokens emitted per verify step (ViSpec's τ−1)",
                            "speedup": "(new tokens / decode seconds) ÷ plain's, totals over the suite, prefill "
                                       "excluded; across suites: geometric mean",
                            "e2e_speedup": "(new tokens / seconds, prefill included) ÷ plain's, totals over the "
                                           "suite: what a user waiting for whole answers sees",
                            "ttft": "median over samples of prefill_seconds: the prompt's target forward, which "
                                    "emits the first token, plus the drafter's catch-up before it is committed",
                            "efficiency": "speedup / (τ·c(1) / (mean c(verify tree) + mean c_draft(step)))"},
            "costs": costs, **summary, **environment(target)}
