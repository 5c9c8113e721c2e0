"""The training pipeline: loss options, the unrolled-step mask against decoding, collect (teacher forcing,
regenerate, resume), the batch stream and curriculum, train + resume after a kill, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import tiny, write_suite  # noqa: F401  (pytest fixture)

from vlmspec.cli import main
from vlmspec.target import Target
from vlmspec.testing import FAMILIES, save_tiny_model
from vlmspec.drafters import build_drafter, load_drafter
from vlmspec.drafters.layers import causal_mask
from vlmspec.engine import Generator
from vlmspec.tree import TreeConfig
from vlmspec.train.batch import TrainBatch
from vlmspec.train.collect import CollectConfig, collect
from vlmspec.train.data import BatchStream, CollectedData, Curriculum
from vlmspec.train.losses import LossConfig, pair_targets, ranking_loss, shift_features, ttt_mask
from vlmspec.bench.suites import read_suite
from vlmspec.train.trainer import TrainConfig, train


# ---------------------------------------------------------------------------------------------- losses
def test_loss_config_parse_and_validation():
    config = LossConfig.parse("steps=3,logit_weight=0.5,self_correction=true,sampled-token=1")
    assert (config.steps, config.logit_weight, config.self_correction, config.sampled_token) == (3, 0.5, True, True)
    assert LossConfig.parse("", LossConfig(steps=2)).steps == 2
    for bad in ["steps=0", "bogus=1", "steps", "logit_weight=x", "self_correction=maybe", "feature_weight=-1",
                "kv_consistency_weight=1", "feature_weight=0,logit_weight=0"]:
        with pytest.raises(ValueError):
            LossConfig.parse(bad)


def test_ttt_mask_pattern():
    allowed = ttt_mask(4, 2, torch.float32)[0, 0] == 0                        # [4, 8]
    # pair 2 at step 2: true pairs 0..1, and its own step-2 copy (key 4 + 2)
    assert allowed[2].nonzero().flatten().tolist() == [0, 1, 6]
    assert allowed[0].nonzero().flatten().tolist() == [4]
    step3 = ttt_mask(5, 3, torch.float32)[0, 0] == 0                           # [5, 15]
    assert step3[4].nonzero().flatten().tolist() == [0, 1, 2, 5 + 3, 10 + 4]


def test_ranking_loss_prefers_the_target_order():
    target = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    good = ranking_loss(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), target, k=3)
    bad = ranking_loss(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), target, k=3)
    assert good < bad


def test_unrolled_step_equals_decoding_on_own_features(tiny):
    """Step 2 of the training-time test at pair i is what decoding computes for a depth-1 node after pair i-1."""
    target, _, suite, _ = tiny
    drafter = build_drafter("eagle", target, seed=3)
    sample = read_suite(suite)[0]
    _, prefill = target.prefill(target.encode(sample.images, sample.prompt))
    batch = TrainBatch.from_prefill(prefill, drafter.feature_layers())
    pairs = pair_targets(batch, target.num_layers)
    features = drafter.input_features(batch.hidden_states)[:, :-1]
    count = pairs.tokens.shape[1]
    with torch.no_grad():
        cache = drafter.decoder.new_cache()
        first = drafter(pairs.tokens, features, pairs.positions, ttt_mask(count, 1, torch.float32), cache)
        second = drafter(pairs.tokens, shift_features(first, features), pairs.positions,
                         ttt_mask(count, 2, torch.float32), cache)
        for i in (3, count - 1):
            inputs = torch.cat([features[:, :i], first[:, i - 1 : i]], dim=1)           # true pairs, then own
            chain = drafter(pairs.tokens[:, : i + 1], inputs, pairs.positions[:, : i + 1],
                            causal_mask(i + 1, torch.float32))
            torch.testing.assert_close(second[:, i], chain[:, i], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- collect
def test_collect_teacher_forcing(tiny, monkeypatch):
    target, _, suite, data = tiny
    samples = read_suite(suite)
    meta = json.loads((data / "collect.json").read_text())
    assert meta["samples"] == len(samples) and meta["layers"] == [0, 1, 2]
    shard = load_file(str(data / "shard-00000.safetensors"))
    ids, loss_mask = shard["0/input_ids"], shard["0/loss_mask"].bool()
    answer = target.tokenizer(" " + samples[0].reference, add_special_tokens=False)["input_ids"]
    answer += [target.tokenizer.eos_token_id]
    assert ids[-len(answer):].tolist() == answer
    assert int(loss_mask.sum()) == len(answer) and not loss_mask[-1] and loss_mask[-len(answer) - 1]
    assert shard["0/hidden/2"].dtype == torch.bfloat16 and shard["0/hidden/2"].shape == (len(ids), target.hidden_size)
    second = load_file(str(data / "shard-00001.safetensors"))                 # samples 3…5; 3 is text-only
    assert shard["0/image_mask"].bool().any() and not second["0/image_mask"].bool().any()
    # resumable: finished shards are kept; a collection with other settings is refused
    import vlmspec.train.collect as collect_module

    monkeypatch.setattr(collect_module, "collect_sample", lambda *a: pytest.fail("recollected a finished shard"))
    collect(target, samples, data, CollectConfig(layers=[0, 1, 2], shard_size=3), progress=False)
    with pytest.raises(ValueError, match="different collection"):
        collect(target, samples, data, CollectConfig(layers=[2], shard_size=3), progress=False)


def test_collect_resumes_after_a_partial_run(tiny, tmp_path):
    target, _, suite, _ = tiny
    samples = read_suite(suite)
    config = CollectConfig(layers=[2], shard_size=3)
    collect(target, samples[:3], tmp_path / "partial", CollectConfig(layers=[2], shard_size=3), progress=False)
    (tmp_path / "partial" / "collect.json").unlink()          # as if killed after the first shard
    collect(target, samples, tmp_path / "partial", config, progress=False)
    collect(target, samples, tmp_path / "full", config, progress=False)
    for index in range(3):
        name = f"shard-{index:05d}.safetensors"
        a, b = load_file(str(tmp_path / "partial" / name)), load_file(str(tmp_path / "full" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_collect_regenerate_stores_the_targets_own_answer(tiny, tmp_path):
    target, _, suite, _ = tiny
    sample = read_suite(suite)[0]
    config = CollectConfig(layers=[2], regenerate=True, long_answer_suffix="in detail", max_new_tokens=6)
    out = collect(target, [sample], tmp_path / "regen", config, progress=False)
    shard = load_file(str(out / "shard-00000.safetensors"))
    expected = Generator(target).generate(sample.images, prompt=sample.prompt + " in detail", max_new_tokens=6)
    assert int(shard["0/loss_mask"].sum()) == len(expected.token_ids)
    assert shard["0/input_ids"][-len(expected.token_ids):].tolist() == expected.token_ids
    speculative = Generator(target, build_drafter("prompt-lookup", target), TreeConfig("chain", depth=3))
    out = collect(target, [sample], tmp_path / "regen-with", config, progress=False, generator=speculative)
    assert torch.equal(load_file(str(out / "shard-00000.safetensors"))["0/input_ids"], shard["0/input_ids"])


@pytest.mark.parametrize("family", [name for name in FAMILIES if name != "llama"])
def test_collect_and_train_every_family(family, tmp_path):
    """Per-token inputs (attention mask, Qwen2-VL token types) follow the answer; M-RoPE positions are stored."""
    torch.manual_seed(0)
    target = Target.from_pretrained(save_tiny_model(tmp_path / "model", family, lm_head_scale=8.0),
                                    dtype=torch.float32)
    samples = read_suite(write_suite(tmp_path / "suite", 4))
    data = collect(target, samples, tmp_path / "data", CollectConfig(layers=[0, 1, 2]), progress=False)
    collected = CollectedData([data], [0, 1, 2], target)
    first = collected.load(0)
    sample = samples[0]
    inputs = target.encode(sample.images, sample.prompt)
    _, prefill = target.prefill(inputs)
    prompt = inputs["input_ids"].shape[1]
    torch.testing.assert_close(first["hidden/2"][:prompt].float(), prefill.hidden_states[2][0].bfloat16().float())
    assert first["positions"].shape[-1] == first["input_ids"].shape[0]
    assert first["positions"][..., :prompt].long().equal(prefill.positions[..., 0, :])    # M-RoPE: all 3 axes
    assert collected.batch([0, 1]).positions.shape[:-2] == prefill.positions.shape[:-2]
    train(target, [data], tmp_path / "lumen", TrainConfig("lumen", steps=2, batch_size=2), progress=False)
    train(target, [data], tmp_path / "vispec", TrainConfig("vispec", steps=2, batch_size=2), progress=False)


# ---------------------------------------------------------------------------------------------- data
def test_batches_and_curriculum(tiny):
    target, _, _, data = tiny
    collected = CollectedData([data], [0, 2], target)
    assert len(collected) == 8
    batch = collected.batch([0, 3])
    lengths = [collected.samples[i].length for i in (0, 3)]
    assert batch.input_ids.shape == (2, max(lengths)) and batch.hidden_states[2].dtype == torch.float32
    assert batch.attention_mask.sum(1).tolist() == lengths
    curriculum = Curriculum.parse("text-first:3,ramp:4")
    assert [curriculum.multimodal_share(s, 0.75) for s in (0, 2, 3, 6, 9)] == [0, 0, 0.1875, 0.75, 0.75]
    stream = BatchStream(collected, 4, seed=0, curriculum=curriculum)
    for step in range(3):
        assert not any(collected.samples[i].has_image for i in stream.next_batch(step))
    position = stream.state_dict()
    ahead = [stream.next_batch(step) for step in range(3, 8)]
    stream.load_state_dict(position)
    assert [stream.next_batch(step) for step in range(3, 8)] == ahead
    for bad in ("text-first", "ramp:x", "warm:3"):
        with pytest.raises(ValueError):
            Curriculum.parse(bad)
    with pytest.raises(ValueError, match="lacks hidden-state layer"):
        CollectedData([data], [5])


# ---------------------------------------------------------------------------------------------- train
def test_resume_after_a_kill_reaches_the_same_weights(tiny, tmp_path):
    target, _, _, data = tiny
    config = TrainConfig("eagle", steps=6, batch_size=2, lr=1e-3, warmup=2, bf16=False, checkpoint_every=2,
                         loss="feature_noise=0.05,sampled_token=true", curriculum="text-first:2")
    whole = train(target, [data], tmp_path / "whole", config, progress=False)

    class Killed(Exception):
        pass

    def kill(step, metrics):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train(target, [data], tmp_path / "resumed", config, progress=False, on_step=kill)
    resumed = train(target, [data], tmp_path / "resumed", config, progress=False)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    loaded = load_drafter(tmp_path / "resumed", target)
    assert torch.equal(loaded.fc.weight, resumed.fc.weight)
    with pytest.raises(ValueError, match="other settings"):
        train(target, [data], tmp_path / "resumed", TrainConfig("eagle", steps=6, lr=1e-2), progress=False)


def test_init_continues_from_a_trained_drafter(tiny, tmp_path):
    target, _, _, data = tiny
    first = train(target, [data], tmp_path / "first", TrainConfig("eagle", steps=3, batch_size=2, lr=1e-2,
                                                                     bf16=False, seed=1), progress=False)
    fresh = build_drafter("eagle", target)
    assert not torch.equal(first.fc.weight, fresh.fc.weight)
    config = TrainConfig("eagle", steps=1, batch_size=2, lr=1e-6, warmup=1, bf16=False, init=str(tmp_path / "first"))
    continued = train(target, [data], tmp_path / "continued", config, progress=False)
    torch.testing.assert_close(continued.fc.weight, first.fc.weight.float(), rtol=0, atol=1e-5)
    assert not torch.equal(continued.fc.weight, first.fc.weight)  # and it did train
    with pytest.raises(ValueError, match="drafter type eagle, not eagle3"):
        train(target, [data], tmp_path / "x", TrainConfig("eagle3", steps=1, init=str(tmp_path / "first")),
              progress=False)
    with pytest.raises(ValueError, match="cannot be combined with --init"):
        train(target, [data], tmp_path / "y", TrainConfig("eagle", steps=1, init=str(tmp_path / "first"),
                                                          drafter_options={"num_layers": 1}), progress=False)


def test_cli_help(capsys):
    for command in ("collect", "train"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "--out" in capsys.readouterr().out


def test_cli_collect_train_generate(tiny, tmp_path, capsys):
    target, model_dir, suite, _ = tiny
    data, out = tmp_path / "data", tmp_path / "drafter"
    assert main(["collect", "--target", str(model_dir), "--suite-file", str(suite), "--out", str(data),
                 "--drafters", "eagle3", "--max-samples", "4", "--regenerate", "--max-new-tokens", "6",
                 "--long-answer-suffix", "in detail", "--quiet"]) == 0
    meta = json.loads((data / "collect.json").read_text())
    assert meta["layers"] == [1, 2] and meta["regenerate"] and meta["samples"] == 4
    assert main(["train", "--drafter", "eagle3", "--target", str(model_dir), "--data", str(data), "--out", str(out),
                 "--steps", "2", "--batch-size", "2", "--loss", "steps=2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["generate", "--target", str(model_dir), "--drafter", str(out), "--prompt", "how are you",
                 "--max-new-tokens", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["new_tokens"] == 5


@pytest.mark.parametrize("argv, message", [
    (["collect", "--suite-file", "missing.jsonl"], "not found"),
    (["collect", "--layers", "0,9"], "out of range"),
    (["collect"], "--suites, --suite-file or --data"),
    (["collect", "--long-answer-suffix", "long"], "only apply with --regenerate"),
    (["collect", "--regenerate-with", "testbed:eagle"], "only apply with --regenerate"),
    (["collect", "--suites", "nope"], "unknown suite"),
    (["train", "--drafter", "nope", "--steps", "1"], "unknown drafter type"),
    (["train", "--drafter", "eagle", "--steps", "1", "--loss", "bogus=1"], "bad loss option"),
    (["train", "--drafter", "eagle"], "--steps or --minutes"),
    (["train", "--drafter", "prompt-lookup", "--steps", "1"], "no trainable weights"),
    (["train", "--drafter", "eagle", "--steps", "1", "--curriculum", "later:3"], "bad curriculum"),
])
def test_cli_bad_input_exits_2(tiny, tmp_path, capsys, argv, message):
    _, model_dir, suite, data = tiny
    command, *rest = argv
    extra = ["--target", str(model_dir), "--out", str(tmp_path / "out")]
    if command == "collect" and "--suite-file" not in rest and rest:
        extra += ["--suite-file", str(suite)]
    if command == "train":
        extra += ["--data", str(data)]
    assert main([command, *rest, *extra]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error and len(error.strip().splitlines()) == 1
