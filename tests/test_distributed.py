"""`vlmspec collect` and `vlmspec train` under `torchrun --nproc-per-node 2` on the CPU (gloo): the same features
and (up to float rounding) the same weights as one process, checkpoints that resume on another process count,
FSDP, and the `--device-map` plumbing. Each launch runs in a subprocess with a timeout, so a hang fails."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import tiny  # noqa: F401  (pytest fixture)

import vlmspec
from vlmspec.bench.suites import read_suite
from vlmspec.cli import main
from vlmspec.drafters import build_drafter
from vlmspec.train import distributed
from vlmspec.train.collect import CollectConfig, collect
from vlmspec.train.trainer import TrainConfig, train

LAUNCH_TIMEOUT = 240          # seconds; a launch takes ~25 s on a loaded 2-core machine, a hang never ends
# The run every training test compares with: eagle3 (3 unrolled steps: loss terms with different pair counts),
# global batch 4, fp32 (bf16 autocast would round differently per batch shape), no random loss option (those draw
# per rank).
CONFIG = dict(steps=4, batch_size=4, lr=1e-3, warmup=2, bf16=False, checkpoint_every=1, curriculum="text-first:2")
TRAIN_ARGS = ["--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--warmup", "2", "--no-bf16",
              "--checkpoint-every", "1", "--curriculum", "text-first:2", "--dtype", "fp32", "--quiet"]
# Two processes sum each gradient in two halves and pad each half to its own length: the weights differ from one
# process's by float rounding only (measured 1.5e-8 after 4 steps, while training moves them by 3e-3; one weight
# per rank instead of one per loss term misses by 1.5e-5, and an unweighted mean of the two halves' losses, the
# classic mistake, by 2.9e-3 on eagle).
ATOL = 1e-5


def launch(processes: int, argv: list[str]) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc-per-node N -m vlmspec.cli ARGV` on a free port, one thread each."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = str(Path(vlmspec.__file__).parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "vlmspec.cli", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_weights_close(folder: Path, reference: dict[str, torch.Tensor], atol: float = ATOL) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor.detach(), rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):  # noqa: F811
    """The one-process run every training test is compared with, and how far training moved the weights."""
    target, _, _, data = tiny
    drafter = train(target, [data], tmp_path_factory.mktemp("one") / "drafter", TrainConfig("eagle3", **CONFIG),
                    progress=False)
    start = build_drafter("eagle3", target, seed=0).state_dict()
    moved = max(float((drafter.state_dict()[k] - start[k]).abs().max()) for k in start)
    assert moved > 100 * ATOL                       # so a wrong split (moving as far as training does) fails
    return drafter.state_dict()


def train_args(tiny, out: Path) -> list[str]:  # noqa: F811
    _, model_dir, _, data = tiny
    return ["train", "--drafter", "eagle3", "--target", str(model_dir), "--data", str(data), "--out", str(out),
            *TRAIN_ARGS]


def test_two_processes_reach_the_weights_of_one(tiny, reference, tmp_path):  # noqa: F811
    out = tmp_path / "two"
    result = ok(launch(2, train_args(tiny, out)))
    assert_weights_close(out, reference)
    assert result.stdout.count("drafter written to") == 1                         # rank 0 alone prints
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]                         # rank 0 alone logs
    assert json.loads((out / "train_config.json").read_text())["processes"] == 2


def test_two_process_run_stopped_midway_resumes_on_one_process(tiny, reference, tmp_path):  # noqa: F811
    target, _, _, data = tiny
    out = tmp_path / "resumed"
    ok(launch(2, train_args(tiny, out) + ["--stop-at", "2"]))
    state = torch.load(out / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and len(state["rank_rng"]) == 2
    resumed = train(target, [data], out, TrainConfig("eagle3", **CONFIG), progress=False)
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=ATOL, msg=name)
    assert_weights_close(out, reference)
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_fsdp_resumes_a_one_process_checkpoint(tiny, tmp_path):  # noqa: F811
    """FSDP loads a one-process checkpoint (sharding it), trains on, and saves whole weights again. vispec, batch 2:
    at steps 3, 4, 6 and 8 one rank's slice is text-only, so its image parts get no gradient there (FSDP must
    still reduce them, or the ranks' collectives stop matching)."""
    target, model_dir, _, data = tiny
    config = TrainConfig("vispec", steps=8, batch_size=2, lr=1e-3, warmup=2, bf16=False)
    reference = train(target, [data], tmp_path / "one", config, progress=False).state_dict()
    start = build_drafter("vispec", target, seed=0).state_dict()
    assert max(float((reference[k] - start[k]).abs().max()) for k in start) > 100 * ATOL
    out = tmp_path / "fsdp"
    train(target, [data], out, TrainConfig(**{**config.__dict__, "stop_at": 1}), progress=False)
    ok(launch(2, ["train", "--drafter", "vispec", "--target", str(model_dir), "--data", str(data), "--out", str(out),
                  "--steps", "8", "--batch-size", "2", "--lr", "1e-3", "--warmup", "2", "--no-bf16", "--dtype", "fp32",
                  "--quiet", "--fsdp"]))
    assert_weights_close(out, reference)
    state = torch.load(out / "trainer_state.pt", weights_only=False)
    trained = [p for p in build_drafter("vispec", target).parameters() if p.requires_grad]
    assert state["step"] == 8 and sorted(state["optimizer"]["state"]) == list(range(len(trained)))  # by index


def test_two_process_collect_writes_the_same_features(tiny, tmp_path):  # noqa: F811
    target, model_dir, suite, _ = tiny
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                        # as each launched process: the same float sums
    try:
        config = CollectConfig(layers=[0, 1, 2], shard_size=3, sources=[f"file:{suite.resolve()}"])
        one = collect(target, read_suite(suite), tmp_path / "one", config, progress=False)
    finally:
        torch.set_num_threads(threads)
    argv = ["collect", "--target", str(model_dir), "--suite-file", str(suite), "--layers", "0,1,2",
            "--shard-size", "3", "--dtype", "fp32", "--quiet"]
    two = tmp_path / "two"
    ok(launch(2, argv + ["--out", str(two)]))
    names = sorted(path.name for path in one.iterdir())
    assert names == sorted(path.name for path in two.iterdir()) and len(names) == 4   # collect.json + 3 shards
    assert (one / "collect.json").read_text() == (two / "collect.json").read_text()
    for name in names[1:]:
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name
    # a check on rank 0 fails every rank alike (no rank left waiting), with one line each
    result = launch(2, ["collect", "--target", str(model_dir), "--suite-file", str(suite), "--layers", "2",
                        "--out", str(two), "--quiet"])
    assert result.returncode != 0 and result.stderr.count("holds a different collection") == 2


def test_batch_must_split_evenly(tiny, monkeypatch, tmp_path):  # noqa: F811
    target, _, _, data = tiny
    monkeypatch.setattr(distributed, "current", lambda: distributed.Rank(0, 3))
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        train(target, [data], tmp_path / "x", TrainConfig("eagle", steps=1, batch_size=4), progress=False)


def test_device_map_reaches_from_pretrained(tiny, monkeypatch, tmp_path):  # noqa: F811
    """On this CPU machine HF's device_map cannot be exercised; the option must reach `from_pretrained`."""
    import transformers

    _, model_dir, suite, _ = tiny
    auto = transformers.AutoModelForImageTextToText
    original = auto.from_pretrained.__func__
    seen = []

    def spy(cls, path, **kwargs):
        seen.append(kwargs.pop("device_map", None))
        return original(cls, path, **kwargs)

    monkeypatch.setattr(auto, "from_pretrained", classmethod(spy))
    assert main(["collect", "--target", str(model_dir), "--suite-file", str(suite), "--layers", "2",
                 "--max-samples", "1", "--device-map", "auto", "--out", str(tmp_path / "data"), "--quiet"]) == 0
    assert seen == ["auto"]
    assert distributed.target_placement(None) == {} and distributed.target_placement("auto") == {"device_map": "auto"}
