"""The trainable drafters of this pipeline (eagle, eagle3, lumen): the loss falls, every loss option runs,
training and decoding compute the same thing, and trained drafters stay lossless (greedy and sampling)."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import tiny  # noqa: F401  (pytest fixture)

from vlmspec.drafters import build_drafter
from vlmspec.drafters.layers import causal_mask
from vlmspec.engine import Generator
from vlmspec.testing import compare_greedy
from vlmspec.train.batch import TrainBatch
from vlmspec.train.data import CollectedData
from vlmspec.train.losses import LossConfig, pair_targets
from vlmspec.bench.suites import read_suite
from vlmspec.train.trainer import TrainConfig, train
from vlmspec.tree import TreeConfig

TYPES = ["eagle", "eagle3", "lumen"]
OPTIONS = ["", "feature_noise=0.1", "ranking_weight=0.5", "self_correction=true", "sampled_token=true",
           "steps=3,kv_consistency_weight=0.5", "steps=2,step_decay=1.0,logit_weight=1.0,feature_weight=0"]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """Each type trained 30 steps on the tiny data; returns {type: (drafter, losses)}."""
    target, _, _, data = tiny
    out = {}
    for drafter_type in TYPES:
        losses = []
        drafter = train(target, [data], tmp_path_factory.mktemp(drafter_type),
                        TrainConfig(drafter_type, steps=30, batch_size=2, lr=3e-3, warmup=2, bf16=False, seed=1),
                        progress=False, on_step=lambda step, metrics: losses.append(metrics["loss"]))
        out[drafter_type] = (drafter.eval(), losses)
    return out


@pytest.mark.parametrize("drafter_type", TYPES)
def test_loss_falls(trained, drafter_type):
    _, losses = trained[drafter_type]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, f"{drafter_type}: loss {first:.3f} → {last:.3f}"


@pytest.mark.parametrize("drafter_type", TYPES)
@pytest.mark.parametrize("options", OPTIONS)
def test_every_loss_option_trains(tiny, drafter_type, options):
    target, _, _, data = tiny
    torch.manual_seed(0)
    drafter = build_drafter(drafter_type, target, seed=0).float().train()
    config = LossConfig.parse(options, drafter.default_loss_config())
    collected = CollectedData([data], drafter.feature_layers(), target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = drafter.training_loss(collected.batch([0, 3, 5]), config)
    loss.backward()
    assert torch.isfinite(loss) and loss.dim() == 0
    assert {f"acc@{d}" for d in range(1, config.steps + 1)} <= set(metrics) and "loss" in metrics
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in drafter.parameters())
    if config.self_correction:
        assert "acc@sc" in metrics


@pytest.mark.parametrize("drafter_type", TYPES)
def test_training_forward_matches_decoding(tiny, trained, drafter_type):
    """The catch-up forward of decoding (prompt pairs) equals step 1 of training on the same sequence."""
    target, _, suite, _ = tiny
    drafter, _ = trained[drafter_type]
    sample = read_suite(suite)[1]
    _, prefill = target.prefill(target.encode(sample.images, sample.prompt))
    batch = TrainBatch.from_prefill(prefill, drafter.feature_layers())
    pairs = pair_targets(batch, target.num_layers)
    count = pairs.tokens.shape[1]
    with torch.no_grad():
        extra = drafter.training_extra(batch)
        trained_out = drafter(pairs.tokens, drafter.input_features(batch.hidden_states)[:, :-1], pairs.positions,
                              causal_mask(count, torch.float32), None, extra)                 # [1, n, H]
        state = drafter.begin(target, prefill, first_token=int(prefill.logits.argmax()))
        drafter.ready(state)                                                    # the prompt's entries
        decoded = drafter.decoder(state.catchup[None], state.catchup_positions[None],
                                  causal_mask(count + 1, torch.float32), None)[0]         # the catch-up forward
    torch.testing.assert_close(decoded[:count], trained_out[0], rtol=1e-4, atol=1e-5)
    if drafter_type == "lumen":
        assert drafter.glob.weight.abs().sum() > 0 and drafter.visual.weight.abs().sum() > 0
        assert state.context is not None and extra is not None


@pytest.mark.parametrize("drafter_type", TYPES)
def test_trained_and_untrained_drafters_stay_lossless(tiny, trained, drafter_type):
    target, _, suite, _ = tiny
    variants = {"trained": trained[drafter_type][0], "untrained": build_drafter(drafter_type, target, seed=2)}
    tree = TreeConfig("dynamic", depth=4, topk=3, total_tokens=10)
    for name, drafter in variants.items():
        for sample in read_suite(suite)[:3]:
            inputs = target.encode(sample.images, sample.prompt)
            with torch.no_grad():
                generated = target.model.generate(**inputs, do_sample=False, max_new_tokens=10)
            reference = generated[0, inputs["input_ids"].shape[1]:].tolist()
            result = Generator(target, drafter, tree).generate(sample.images, prompt=sample.prompt, max_new_tokens=10)
            assert compare_greedy(target.model, inputs, result.token_ids, reference) != "different", name
            sampled = [Generator(target, drafter, tree).generate(sample.images, prompt=sample.prompt, max_new_tokens=8,
                                                                 temperature=0.8, top_p=0.9, seed=5).token_ids
                       for _ in range(2)]
            assert sampled[0] == sampled[1] and all(0 <= t < target.vocab_size for t in sampled[0])


def test_training_on_regenerated_answers_raises_tau(tiny, tmp_path):
    """Each type, trained 60 steps on the target's own answers, drafts tokens the target accepts (τ > 1.2 on
    those prompts; an untrained drafter's τ is about 1)."""
    from vlmspec.train.collect import CollectConfig, collect

    target, _, suite, _ = tiny
    samples = read_suite(suite)
    data = collect(target, samples, tmp_path / "regen",
                   CollectConfig(layers=list(range(target.num_layers + 1)), regenerate=True, max_new_tokens=24),
                   progress=False)
    for drafter_type in TYPES:
        drafter = train(target, [data], tmp_path / drafter_type,
                        TrainConfig(drafter_type, steps=60, batch_size=4, lr=3e-3, warmup=5, bf16=False),
                        progress=False).eval()
        tokens = forwards = 0
        for sample in samples:
            result = Generator(target, drafter, TreeConfig("chain", depth=4)).generate(
                sample.images, prompt=sample.prompt, max_new_tokens=24)
            tokens, forwards = tokens + result.stats.new_tokens, forwards + result.stats.target_forwards
        assert tokens / forwards > 1.2, f"{drafter_type}: τ = {tokens / forwards:.2f}"


def test_configs_round_trip_through_checkpoints(tiny, tmp_path):
    from vlmspec.drafters import load_drafter, save_drafter

    target = tiny[0]
    lumen = build_drafter("lumen", target, seed=0, layers="1,2", global_vector=False)
    assert lumen.layers == [1, 2] and lumen.glob is None and lumen.feature_layers() == [0, 1, 2]
    loaded = load_drafter(save_drafter(lumen, tmp_path / "lumen"), target)
    assert loaded.config == lumen.config
    assert all(torch.equal(a, b) for a, b in zip(lumen.state_dict().values(), loaded.state_dict().values()))
    assert build_drafter("eagle3", target).feature_layers() == [1, 2]
    for bad in ({"layers": "1,x"}, {"layers": [7]}):
        with pytest.raises(ValueError):
            build_drafter("eagle3", target, **bad)
    with pytest.raises(ValueError, match="out of range"):
        build_drafter("eagle", target, feature_layer=5)
