"""The image-aware drafters `msd`, `vispec` and `flash` (and their shared pieces in `drafters/vision.py`).

- fp32 greedy equality with `model.generate` on tiny LLaVA and Idefics3, untrained and trained, chain / static /
  dynamic trees, one and two images (DESIGN's near-tie rule);
- the decode-time draft computes exactly what the training forward computes (prompt layout, compression,
  positions, catch-up through the cache, flash's head), also on Qwen2-VL (M-RoPE) and LLaVA-NeXT;
- on Qwen2-VL every draft entry sits at the target's own 3-axis position, rotated as the target rotates it;
- seeded sampling repeats; a sampled run emits valid tokens;
- each type trains through the trainer on collected data and its loss falls; save/load round trip;
- flash drafts k tree levels per draft forward.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace

import pytest
import torch

from vlmspec import Generator, Target, TreeConfig, build_drafter, load_drafter, save_drafter
from vlmspec.drafters.feature import FeatureDraftBatch, catch_up_mask
from vlmspec.drafters.vision import AttentionPool, Pairs, VisualFeatureDrafter, batch_pairs, build_layout
from vlmspec.testing import compare_greedy, random_image, tiny_model
from vlmspec.train.batch import TrainBatch
from vlmspec.train.losses import LossConfig

DRAFTERS = ["msd", "vispec", "flash"]
VARIANTS = [(name, {}) for name in DRAFTERS] + [("vispec", {"compress": False}), ("vispec", {"global_vector": False}),
                                                ("flash", {"tokens_per_forward": 1})]     # + the ablation switches
VARIANT_IDS = ["-".join([name, *map(str, options.items())]) for name, options in VARIANTS]
FAMILIES = ["llava", "idefics3"]
MORE_FAMILIES = ["qwen2_vl", "llava_next"]     # M-RoPE and tiled images: decoding and decode/training alignment
TREES = [TreeConfig("chain", depth=4), TreeConfig("static", depth=3, topk=3, total_tokens=8),
         TreeConfig("dynamic", depth=4, topk=3, total_tokens=10)]
PROMPTS = [(1, "<image> describe the image"), (2, "<image> compare <image> what color is the cat"),
           (1, "what is in the picture ?")]
MAX_NEW_TOKENS = 12


def make_target(family: str) -> Target:
    model, processor = tiny_model(family, lm_head_scale=8.0, attention_scale=4.0)
    return Target(model, processor)


@pytest.fixture(scope="module", params=FAMILIES)
def target(request):
    return make_target(request.param)


@pytest.fixture(scope="module", params=FAMILIES + MORE_FAMILIES)
def any_target(request):
    return make_target(request.param)


def reference(target: Target, images, prompt: str, max_new_tokens: int = MAX_NEW_TOKENS):
    inputs = target.encode(images, prompt=prompt)
    with torch.no_grad():
        out = target.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return inputs, out[0, inputs["input_ids"].shape[1]:].tolist()


def check_greedy_equality(target: Target, drafter, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    outcomes = {"equal": 0, "near-tie": 0, "different": 0}
    failures = []
    for count, prompt in PROMPTS:
        images = [random_image(rng) for _ in range(count)]
        inputs, expected = reference(target, images, prompt)
        for tree in TREES:
            result = Generator(target, drafter, tree).generate(images, prompt=prompt, max_new_tokens=MAX_NEW_TOKENS)
            outcome = compare_greedy(target.model, inputs, result.token_ids, expected)
            outcomes[outcome] += 1
            if outcome == "different":
                failures.append((prompt, tree.kind, result.token_ids, expected))
    assert not failures, failures[:2]
    return outcomes


def full_batch(target: Target, drafter, images, prompt: str, answer: list[int]) -> TrainBatch:
    """An fp32 TrainBatch of one sequence (prompt + answer, trained on the answer) from a target prefill."""
    inputs = target.encode(images, prompt=prompt)
    extra = torch.tensor([answer])
    full = {key: torch.cat([value, torch.zeros_like(extra) if key != "input_ids" else extra], dim=1)
            if key in ("input_ids", "attention_mask", "mm_token_type_ids") else value for key, value in inputs.items()}
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    _, prefill = target.prefill(full)
    loss_mask = torch.zeros_like(full["input_ids"], dtype=torch.bool)
    loss_mask[0, inputs["input_ids"].shape[1] - 1: -1] = True
    return TrainBatch.from_prefill(prefill, drafter.feature_layers(), loss_mask)


def first_step(target: Target, drafter, depth: int):
    """Prefill a two-image prompt and draft one greedy chain of `depth`: (images, prompt, prefill, first token,
    draft state, tree)."""
    from vlmspec.verify import greedy_scores

    rng = random.Random(4)
    images = [random_image(rng), random_image(rng)]
    prompt = "<image> one <image> two"
    _, prefill = target.prefill(target.encode(images, prompt=prompt))
    first = int(prefill.logits[0].argmax())
    state = drafter.begin(target, prefill, first)
    return images, prompt, prefill, first, state, drafter.propose(state, TreeConfig("chain", depth=depth),
                                                                  greedy_scores)


# ---------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("name, options", VARIANTS, ids=VARIANT_IDS)
def test_untrained_greedy_equality(any_target, name, options):
    outcomes = check_greedy_equality(any_target, build_drafter(name, any_target, seed=1, **options))
    assert outcomes["near-tie"] <= 0.05 * sum(outcomes.values()), outcomes


@pytest.mark.parametrize("name", DRAFTERS)
def test_seeded_sampling_repeats_and_emits_valid_tokens(target, name):
    drafter = build_drafter(name, target, seed=2)
    generator = Generator(target, drafter, TreeConfig("dynamic", depth=4, topk=3, total_tokens=8))
    rng = random.Random(5)
    images = [random_image(rng), random_image(rng)]
    runs = [generator.generate(images, prompt="<image> and <image> describe", max_new_tokens=16, temperature=1.0,
                               top_p=0.9, top_k=30, seed=seed).token_ids for seed in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[2] and all(0 <= token < target.vocab_size for token in runs[2])


def test_flash_drafts_several_levels_per_forward(target):
    depth = 5
    for k in (2, 3):
        drafter = build_drafter("flash", target, seed=0, tokens_per_forward=k)
        image = random_image(random.Random(1))
        for tree in (TreeConfig("chain", depth=depth), TreeConfig("dynamic", depth=depth, topk=3, total_tokens=12)):
            stats = Generator(target, drafter, tree).generate([image], prompt="describe", max_new_tokens=16).stats
            # a step with more than `depth` tokens left (the engine cuts later trees to the tokens left): one
            # catch-up forward, then one decoder forward per k levels: 1 + (depth - 1) // k < depth
            emitted = list(itertools.accumulate([1] + [a + 1 for a in stats.accepted_per_step]))   # before each step
            full = [f for f, done in zip(stats.draft_forwards_per_step, emitted) if 16 - done > depth]
            assert full and set(full) == {1 + (depth - 1) // k}, stats.draft_forwards_per_step
            assert max(stats.draft_forwards_per_step) < depth


def test_flash_head_level_equals_the_training_head(any_target):
    """The feature flash's head gives a drafted node equals the training head at that pair, when the sequence is
    the drafted chain itself (the head sees the parent's feature and the node's own token)."""
    target = any_target
    drafter = build_drafter("flash", target, seed=6)
    calls = []
    original = drafter.head
    drafter.head = lambda level, tokens, features: calls.append(original(level, tokens, features)) or calls[-1]
    with torch.no_grad():
        images, prompt, prefill, first, state, tree = first_step(target, drafter, depth=2)
        assert tree.tokens.shape[1] == 3 and len(calls) == 1 and state.forwards == 1
        batch = full_batch(target, drafter, images, prompt, [first, int(tree.tokens[0, 1])])
        pairs = batch_pairs(drafter, batch)
        layout = build_layout(pairs, drafter.slots_per_run)
        step, _ = drafter.entry_step(pairs, layout)
        count = layout.index.shape[1]
        tokens = layout.gather(pairs.tokens)
        predicted = step(tokens, layout.gather(pairs.features), layout.positions,
                         catch_up_mask([0], count, torch.float32, "cpu"), None)                         # [1, M, H]
        trained = original(1, tokens[:, -1:], predicted[:, -2:-1])[0, 0]                   # the node's pair
    torch.testing.assert_close(calls[0][0, 0], trained, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, options", VARIANTS, ids=VARIANT_IDS)
def test_decode_features_equal_the_training_forward(any_target, name, options, monkeypatch):
    """Catch-up predictions through the draft cache (compressed prompt, positions, verified pairs) equal the
    whole-sequence training forward at the same pairs, step after step."""
    target = any_target
    drafter = build_drafter(name, target, seed=3, **options)
    with torch.no_grad():                      # give every gate and head a non-zero effect
        for parameter in drafter.parameters():
            if parameter.dim() == 1 and not parameter.any():
                parameter.normal_(0, 0.5)
    recorded = []
    original = FeatureDraftBatch._catch_up

    def recording(batch, drafting):
        roots = original(batch, drafting)
        recorded.append((batch.states[0].length, roots[0].clone()))
        return roots

    monkeypatch.setattr(FeatureDraftBatch, "_catch_up", recording)
    rng = random.Random(9)
    images = [random_image(rng), random_image(rng)]
    prompt = "<image> the cat <image> what changed"
    result = Generator(target, drafter, TreeConfig("chain", depth=3)).generate(images, prompt=prompt,
                                                                                max_new_tokens=10)
    batch = full_batch(target, drafter, images, prompt, result.token_ids)
    pairs = batch_pairs(drafter, batch)
    layout = build_layout(pairs, drafter.slots_per_run)
    assert layout.positions.shape[:-2] == batch.positions.shape[:-2]     # M-RoPE: all three axes
    step, _ = drafter.entry_step(pairs, layout)
    count = layout.index.shape[1]
    with torch.no_grad():
        predicted = step(layout.gather(pairs.tokens), layout.gather(pairs.features), layout.positions,
                         catch_up_mask([0], count, torch.float32, "cpu"), None)[0]                # [M, H]
    assert len(recorded) >= 2
    for end, feature in recorded:            # entry end − 1 is the root of that step
        torch.testing.assert_close(feature, predicted[end - 1], atol=1e-4, rtol=1e-4)
    if drafter.slots_per_run is not None:    # the draft cache is shorter than the target's by the compression
        image_tokens = int(batch.image_mask.sum())
        runs = len(batch.image_spans[0])
        assert count == batch.input_ids.shape[1] - 1 - image_tokens + runs * drafter.slots_per_run


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def collected(target, tmp_path_factory):
    """Regenerated answers of a few one/two-image and text-only prompts, collected for every layer."""
    from vlmspec.train.collect import CollectConfig, collect
    from vlmspec.bench.suites import read_suite

    folder = tmp_path_factory.mktemp("suite")
    rng = random.Random(11)
    lines = []
    words = "the cat sat on a red mat what color is it describe image two blue circles".split()
    for index in range(6):
        count = index % 3
        names = []
        for j in range(count):
            random_image(rng).save(folder / f"{index}-{j}.png")
            names.append(f"{index}-{j}.png")
        text = " ".join(rng.choice(words) for _ in range(4))
        lines.append(json.dumps({"id": str(index), "category": "describe", "images": names,
                                 "prompt": "<image> " * count + text}))
    (folder / "suite.jsonl").write_text("\n".join(lines) + "\n")
    layers = list(range(target.num_layers + 1))
    return collect(target, read_suite(folder / "suite.jsonl"), folder / "data",
                   CollectConfig(layers=layers, regenerate=True, max_new_tokens=20), progress=False)


@pytest.mark.parametrize("name", DRAFTERS)
def test_trains_with_the_trainer_and_round_trips(target, collected, name, tmp_path):
    from vlmspec.train.trainer import TrainConfig, train

    losses: list[float] = []
    loss = "self_correction=true,ranking_weight=0.1" if name == "vispec" else ""
    config = TrainConfig(drafter_type=name, steps=60, lr=3e-3, batch_size=2, warmup=1, bf16=False, loss=loss,
                         checkpoint_every=1000, seed=0)
    drafter = train(target, [collected], tmp_path / "run", config, progress=False,
                    on_step=lambda step, metrics: losses.append(metrics["loss"]))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    loaded = load_drafter(tmp_path / "run", target)
    assert type(loaded) is type(drafter)
    for key, value in drafter.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    check_greedy_equality(target, loaded, seed=1)
    # it learned: on a training prompt with images the target's own answer is drafted and accepted
    from vlmspec.bench.suites import read_suite

    sample = read_suite(collected.parent / "suite.jsonl")[2]
    stats = Generator(target, loaded, TreeConfig("chain", depth=4)).generate(
        sample.images, prompt=sample.prompt, max_new_tokens=20).stats
    assert stats.tau > 1.2, stats
    if name == "flash":                       # a node drafted by the head (depth 2) was accepted
        assert len(stats.accepted_by_depth) > 1 and stats.accepted_by_depth[1] > 0, stats
    tree = TreeConfig("dynamic", depth=4, topk=3, total_tokens=8)
    sampled = [Generator(target, loaded, tree).generate(sample.images, prompt=sample.prompt, max_new_tokens=12,
                                                        temperature=0.8, top_p=0.9, seed=7).token_ids for _ in range(2)]
    assert sampled[0] == sampled[1] and all(0 <= token < target.vocab_size for token in sampled[0])


@pytest.mark.parametrize("name", DRAFTERS)
def test_training_loss_metrics_and_options(target, name):
    """Direct `training_loss` on a two-sequence batch: per-depth accuracy metrics, gradients reach the image
    pieces, and the loss options apply."""
    drafter = build_drafter(name, target, seed=4).train()
    rng = random.Random(2)
    images = [random_image(rng), random_image(rng)]
    batch = full_batch(target, drafter, images, "<image> and <image> tell me", list(range(40, 52)))
    config = LossConfig(logit_weight=0.5, ranking_weight=0.1, self_correction=True)
    loss, metrics = drafter.training_loss(batch, config)
    loss.backward()
    assert torch.isfinite(loss) and "acc@1" in metrics and "acc@sc" in metrics
    if name == "flash":
        assert "acc@2" in metrics
        with pytest.raises(ValueError, match="steps=1"):
            drafter.training_loss(batch, LossConfig(steps=2))
    else:
        assert "acc@2" in drafter.training_loss(batch, LossConfig(steps=2))[1]
    visual_pieces = {"msd": "visual_proj", "vispec": "adaptor", "flash": "pool"}[name]
    grads = [p.grad for n, p in drafter.named_parameters() if n.startswith(visual_pieces)]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_save_load_round_trip_keeps_the_config(target, tmp_path):
    for name, options in (("vispec", {"num_queries": 2}), ("flash", {"num_compressed": 3, "tokens_per_forward": 3}),
                          ("msd", {})):
        drafter = build_drafter(name, target, seed=5, **options)
        save_drafter(drafter, tmp_path / name, tree=TreeConfig("chain", depth=3))
        loaded = load_drafter(tmp_path / name, target)
        assert loaded.config == drafter.config
        for key, value in drafter.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value)


# ---------------------------------------------------------------------------------------------- pieces
def test_layout_compresses_each_run_at_spread_positions():
    hidden = 8
    image_mask = torch.tensor([[False, True, True, True, True, True, False, False, True, True, False],
                               [False, False, True, True, False, False, False, False, False, False, False]])
    real = torch.ones_like(image_mask)
    real[1, 8:] = False
    positions = torch.arange(11).expand(2, -1)
    pairs = Pairs(tokens=torch.zeros(2, 11, dtype=torch.long), features=torch.zeros(2, 11, hidden),
                  visual=torch.zeros(2, 11, hidden), image_mask=image_mask & real, positions=positions, real=real)
    layout = build_layout(pairs, 2)
    # sequence 0: pair 0, run [1, 6) → 2 slots at positions 1 and 1 + 5 // 2 = 3, pairs 6, 7, run [8, 10) → 2, 10
    assert layout.index[0].tolist() == [0, -1, -1, 6, 7, -1, -1, 10]
    assert layout.positions[0].tolist() == [0, 1, 3, 6, 7, 8, 9, 10]
    assert layout.runs[0] == [(1, 6, 1), (8, 10, 5)]
    assert layout.index[1].tolist() == [0, 1, -1, -1, 4, 5, 6, 7]
    assert layout.real.sum(1).tolist() == [8, 8]
    assert layout.compressed.sum().item() == 6
    plain = build_layout(pairs, None)
    assert plain.index[1, 8:].tolist() == [-1, -1, -1] and plain.positions.equal(positions)
    # 3-axis positions: every axis is taken from the same pairs
    axes = torch.stack([positions, 2 * positions, 3 * positions])                 # [3, 2, 11]
    mrope = build_layout(replace(pairs, positions=axes), 2)
    assert mrope.index.equal(layout.index)
    assert mrope.positions.equal(torch.stack([layout.positions, 2 * layout.positions, 3 * layout.positions]))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_draft_mrope_equals_the_targets_rotary(family):
    """The draft layer rotates q/k at 3-axis positions exactly as the target's own M-RoPE does; the same number
    on every axis is plain rotary; a head count that changes head_dim is refused for M-RoPE only."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

    from vlmspec.drafters.layers import DraftDecoder, draft_layer_config

    target = make_target(family)
    rotary = target.model.model.language_model.rotary_emb                      # Qwen2(_5)VLRotaryEmbedding
    config = draft_layer_config(target.text_config, mrope=True)
    decoder = DraftDecoder(config)
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, heads, 7, head_dim, generator=generator)
    positions = torch.randint(0, 40, (3, 2, 7), generator=generator)            # [3, B, n], axes unequal
    expected = apply_rotary_pos_emb(q, k, *rotary(q, positions))
    actual = apply_rotary_pos_emb(q, k, *decoder.rotary_embeddings(q, positions))
    for mine, theirs in zip(actual, expected):
        torch.testing.assert_close(mine, theirs)
    text = positions[0]
    for mine, plain in zip(decoder.rotary_embeddings(q, text.expand(3, -1, -1)), decoder.rotary_embeddings(q, text)):
        torch.testing.assert_close(mine, plain)
    with pytest.raises(ValueError, match="head_dim"):
        draft_layer_config(target.text_config, num_heads=2 * heads, mrope=True)
    assert draft_layer_config(target.text_config, num_heads=2 * heads).mrope_section is None    # 1-D (EAGLE)


@pytest.mark.parametrize("name", DRAFTERS)
def test_entries_sit_at_the_targets_3_axis_positions(name):
    """Qwen2-VL: the draft's prompt entries (image tokens on their grid; a compressed run's entries at its spread
    tokens) and its tree nodes get the target's own (t, h, w) positions of their tokens in the full sequence."""
    target = make_target("qwen2_vl")
    drafter = build_drafter(name, target, seed=0)
    calls = []
    forward = drafter.decoder.forward
    drafter.decoder.forward = lambda x, positions, mask, cache=None: calls.append(positions) or forward(
        x, positions, mask, cache)
    with torch.no_grad():
        images, prompt, prefill, first, _, tree = first_step(target, drafter, depth=3)
    drafted = tree.tokens[0, 1:].tolist()
    full = full_batch(target, drafter, images, prompt, [first] + drafted)
    truth = full.positions[:, 0]                                                 # [3, S]: the target's own
    image = full.image_mask[0]
    assert not truth[0, image].equal(truth[2, image])                           # the grid: axes differ
    length = prefill.input_ids.shape[1]                                          # first sits at `length`
    prompt_entries, *nodes = calls
    assert prompt_entries.shape[:2] == (3, 1)
    layout = build_layout(batch_pairs(drafter, full), drafter.slots_per_run)
    source = [index + 1 for index in layout.index[0].tolist()]                  # pair i stands for token i + 1
    for start, end, slot in layout.runs[0] if drafter.slots_per_run else []:
        q = drafter.slots_per_run
        source[slot: slot + q] = [start + 1 + (j * (end - start)) // q for j in range(q)]
    entries = prompt_entries.shape[-1]
    assert source[entries - 1] == length                                         # the catch-up ends at `first`
    assert prompt_entries[:, 0].equal(truth[:, source[:entries]])
    node_positions = torch.cat([positions[:, 0] for positions in nodes], dim=-1)   # chain: one node per level
    assert node_positions.shape[-1] >= 2
    assert node_positions.equal(truth[:, length + 1: length + 1 + node_positions.shape[-1]])


def test_attention_pool_ignores_padding_and_the_gate_starts_closed(target):
    pool = AttentionPool(16, 3, 2)
    tokens = torch.randn(1, 5, 16)
    padded = torch.cat([tokens, torch.randn(1, 4, 16)], dim=1)
    valid = torch.tensor([[True] * 5 + [False] * 4])
    torch.testing.assert_close(pool(padded, valid), pool(tokens))
    vispec = build_drafter("vispec", target)
    assert isinstance(vispec, VisualFeatureDrafter)
    tokens, features = torch.tensor([[5, 6]]), torch.randn(1, 2, target.hidden_size)
    context = torch.randn(1, 2, target.hidden_size)
    torch.testing.assert_close(vispec.text_inputs(tokens, features, context),
                               vispec.text_inputs(tokens, features, None))
