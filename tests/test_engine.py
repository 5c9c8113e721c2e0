"""The target adapter and the generation loop: tree-verify logits, cache commit, sampling, streaming, stops."""

from __future__ import annotations

import random

import pytest
import torch

from vlmspec import Generator, Target, TreeConfig, build_drafter
from vlmspec.testing import random_image, save_tiny_model
from vlmspec.tree import Tree, TreeBuilder


@pytest.fixture(scope="module", params=["llava", "idefics3"])
def target_dir(request, tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param, lm_head_scale=8.0,
                           attention_scale=4.0)


@pytest.fixture(scope="module")
def target(target_dir):
    return Target.from_pretrained(target_dir, dtype=torch.float32)


def full_forward_logits(target: Target, inputs: dict, extra: list[int]) -> torch.Tensor:
    """Logits of a plain causal forward over prompt + extra tokens, for the extra tokens. [len(extra), V]"""
    kwargs = dict(inputs)
    kwargs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([extra])], dim=1)
    kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
    with torch.no_grad():
        return target.model(**kwargs).logits[0, -len(extra):].float()


def test_tree_verify_logits_equal_each_branch_run_as_a_chain(target):
    rng = random.Random(3)
    inputs = target.encode([random_image(rng), random_image(rng)], prompt="<image> and <image> compare them")
    generator = torch.Generator().manual_seed(0)
    for kind in ("dynamic", "static"):
        state, _ = target.prefill(inputs)
        builder = TreeBuilder(TreeConfig(kind, depth=3, topk=3, total_tokens=9), root_token=17)
        while builder.frontier():
            builder.expand(torch.randn(len(builder.frontier()), target.vocab_size, generator=generator))
        tree = builder.build()
        verified = target.verify(state, tree)
        for leaf_path in tree.leaf_paths(0):
            branch = tree.tokens[0, leaf_path].tolist()
            expected = full_forward_logits(target, inputs, branch)
            torch.testing.assert_close(verified.logits[0, leaf_path], expected, atol=1e-4, rtol=1e-4)


def test_commit_keeps_an_accepted_path_and_drops_the_rest(target):
    inputs = target.encode([random_image(random.Random(4))], prompt="what color is it")
    state, prefill = target.prefill(inputs)
    prompt_length = state.length
    tokens = torch.tensor([[5, 7, 9, 11, 13]])
    parents = torch.tensor([[-1, 0, 0, 2, 1]])
    target.verify(state, Tree(tokens, parents, torch.tensor([5])))
    target.commit(state, [0, 2, 3])                           # path 5 → 9 → 11
    assert state.length == prompt_length + 3 and state.cache.get_seq_length() == prompt_length + 3
    after = target.extend(state, torch.tensor([[21]]), torch.tensor([[-1]]))
    expected = full_forward_logits(target, inputs, [5, 9, 11, 21])[-1]
    torch.testing.assert_close(after.logits[0, 0], expected, atol=1e-4, rtol=1e-4)


def test_prefill_reports_image_spans_and_visual_embeddings(target):
    rng = random.Random(5)
    inputs = target.encode([random_image(rng), random_image(rng)], prompt="<image> one <image> two")
    _, prefill = target.prefill(inputs)
    spans = prefill.image_spans[0]
    assert len(spans) >= 2 and all(end > start for start, end in spans)
    assert int(prefill.image_mask.sum()) == sum(end - start for start, end in spans)
    text_embeddings = target.embed_tokens(prefill.input_ids)
    # [0] holds the input embeddings: text positions are the token embeddings, image positions are not
    torch.testing.assert_close(prefill.hidden_states[0][~prefill.image_mask], text_embeddings[~prefill.image_mask])
    assert not torch.allclose(prefill.hidden_states[0][prefill.image_mask], text_embeddings[prefill.image_mask])


@pytest.mark.parametrize("drafter_name", ["eagle", "prompt-lookup", "self"])
def test_seeded_sampling_repeats_exactly(target, target_dir, drafter_name):
    drafter = (build_drafter("draft-model", target, model=str(target_dir)) if drafter_name == "self"
               else build_drafter(drafter_name, target))
    generator = Generator(target, drafter, TreeConfig("dynamic", depth=3, topk=3, total_tokens=8))
    image = random_image(random.Random(6))
    runs = [generator.generate([image], prompt="describe it", max_new_tokens=16, temperature=1.0, top_p=0.9,
                               top_k=20, seed=seed).token_ids for seed in (11, 11, 12)]
    assert runs[0] == runs[1]
    assert all(0 <= token < target.vocab_size for token in runs[2])


def test_self_draft_sampling_accepts_many_tokens(target, target_dir):
    drafter = build_drafter("draft-model", target, model=str(target_dir))
    image = random_image(random.Random(7))
    result = Generator(target, drafter, TreeConfig("chain", depth=4)).generate(
        [image], prompt="describe it", max_new_tokens=24, temperature=1.0, seed=0)
    assert result.stats.tau > 1.5, result.stats


def test_stream_yields_the_text_of_the_result(target):
    generator = Generator(target, build_drafter("prompt-lookup", target), TreeConfig("chain", depth=3))
    pieces = list(generator.stream([random_image(random.Random(8))], prompt="the cat", max_new_tokens=10))
    result = pieces[-1]
    assert "".join(pieces[:-1]) == result.text
    assert result.stats.new_tokens == len(result.token_ids) == 10


def test_stop_string_and_eos_end_generation(target):
    generator = Generator(target, build_drafter("eagle", target), TreeConfig("chain", depth=3))
    image = random_image(random.Random(9))
    free = generator.generate([image], prompt="the cat", max_new_tokens=12)
    stop_text = free.text[len(free.text) // 2:][:2]
    if stop_text.strip():
        stopped = generator.generate([image], prompt="the cat", max_new_tokens=12, stop=[stop_text])
        assert stop_text in stopped.text and len(stopped.token_ids) <= len(free.token_ids)
    eos = sorted(target.eos_token_ids)[0]
    with torch.no_grad():
        target.model.lm_head.bias = torch.nn.Parameter(torch.zeros(target.vocab_size))
        target.model.lm_head.bias[eos] = 1e4                # the target now always says EOS
    try:
        result = generator.generate([image], prompt="the cat", max_new_tokens=12)
    finally:
        target.model.lm_head.bias = None
    assert result.token_ids == [eos] and result.stats.target_forwards == 1


def test_messages_and_prompt_markers_give_the_same_inputs(target):
    image = random_image(random.Random(10))
    from_prompt = target.encode([image], prompt="<image> what color is it")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it"}]}]
    from_messages = target.encode([image], messages=messages)
    assert torch.equal(from_prompt["input_ids"], from_messages["input_ids"])
    with pytest.raises(ValueError, match="image part"):
        target.encode([image, image], messages=messages)
    without_marker = target.encode([image], prompt="what color is it")          # images first
    assert torch.equal(without_marker["input_ids"], from_prompt["input_ids"])
