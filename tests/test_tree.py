import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmspec.tree import Tree, TreeBuilder, TreeConfig, static_shape


def hand_tree() -> Tree:
    """0 -> {1, 2}, 1 -> {3, 4}, 3 -> {5}."""
    return Tree(
        tokens=torch.tensor([[10, 11, 12, 13, 14, 15]]),
        parents=torch.tensor([[-1, 0, 0, 1, 1, 3]]),
        num_nodes=torch.tensor([6]),
    )


def chain_tree() -> Tree:
    return Tree(tokens=torch.tensor([[20, 21, 22]]), parents=torch.tensor([[-1, 0, 1]]), num_nodes=torch.tensor([3]))


def test_derived_views_of_hand_built_tree():
    tree = hand_tree()
    assert tree.depths().tolist() == [[0, 1, 1, 2, 2, 3]]
    assert tree.ancestor_mask().int().tolist() == [[
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 1],
    ]]
    assert tree.leaf_paths(0) == [[0, 2], [0, 1, 4], [0, 1, 3, 5]]
    assert tree.children(0, 1) == [3, 4]
    assert tree.path_to(0, 5) == [0, 1, 3, 5]


def test_stack_pads_smaller_tree():
    tree = Tree.stack([hand_tree(), chain_tree()])
    assert tree.tokens.tolist() == [[10, 11, 12, 13, 14, 15], [20, 21, 22, 0, 0, 0]]
    assert tree.parents.tolist() == [[-1, 0, 0, 1, 1, 3], [-1, 0, 1, -1, -1, -1]]
    assert tree.num_nodes.tolist() == [6, 3]
    assert tree.depths().tolist() == [[0, 1, 1, 2, 2, 3], [0, 1, 2, 0, 0, 0]]
    assert torch.equal(tree.ancestor_mask()[0], hand_tree().ancestor_mask()[0])
    assert tree.ancestor_mask()[1].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert tree.leaf_paths(1) == [[0, 1, 2]]


def test_root_only():
    tree = Tree.root_only(torch.tensor([7, 8]))
    assert tree.tokens.tolist() == [[7], [8]]
    assert tree.parents.tolist() == [[-1], [-1]]
    assert tree.leaf_paths(1) == [[0]]


def run_builder(builder: TreeBuilder, logprobs_fn) -> tuple[Tree, list[list[int]]]:
    """Drive a builder the way a drafter does; logprobs_fn(token path) -> [V]. Returns the tree and frontiers."""
    frontiers = []
    tokens_by_node = {0: (builder.token(0),)}
    while frontier := builder.frontier():
        frontiers.append(frontier)
        logprobs = torch.stack([logprobs_fn(tokens_by_node[n]) for n in frontier])  # [F, V]
        for n in builder.expand(logprobs):
            assert builder.depth(n) == len(tokens_by_node[builder.parent(n)])
            tokens_by_node[n] = tokens_by_node[builder.parent(n)] + (builder.token(n),)
    return builder.build(), frontiers


def table_logprobs(table: dict):
    return lambda path: torch.tensor(table[path]).log()


def test_greedy_dynamic_literal():
    # cum: (0)=.5, (1)=.35, (1,0)=.315, (0,2)=.30, (0,3)=.10, (1,1)=.014 -> best 4 keep (0), (1), (1,0), (0,2)
    table = {
        (9,): [0.5, 0.35, 0.1, 0.03, 0.02],
        (9, 0): [0.05, 0.1, 0.6, 0.2, 0.05],
        (9, 1): [0.9, 0.04, 0.03, 0.02, 0.01],
    }
    builder = TreeBuilder(TreeConfig("dynamic", depth=2, topk=2, total_tokens=4), 9)
    tree, frontiers = run_builder(builder, table_logprobs(table))
    assert frontiers == [[0], [1, 2]]
    assert tree.tokens.tolist() == [[9, 0, 1, 2, 0]]
    assert tree.parents.tolist() == [[-1, 0, 0, 1, 2]]
    assert tree.num_nodes.tolist() == [5]


def test_dynamic_frontier_keeps_topk_of_newest_level():
    table = {
        (9,): [0.5, 0.35, 0.1, 0.03, 0.02],
        (9, 0): [0.05, 0.1, 0.6, 0.2, 0.05],
        (9, 1): [0.9, 0.04, 0.03, 0.02, 0.01],
    }
    builder = TreeBuilder(TreeConfig("dynamic", depth=3, topk=2, total_tokens=10), 9)
    uniform = lambda path: table.get(path, [0.2] * 5)  # noqa: E731
    _, frontiers = run_builder(builder, lambda path: torch.tensor(uniform(path)).log())
    # level 2 in creation order: (0,2)=.30, (0,3)=.10, (1,0)=.315, (1,1)=.014 -> nodes 3, 4, 5, 6
    assert frontiers == [[0], [1, 2], [3, 5]]


@pytest.mark.parametrize("kind", ["dynamic", "chain"])
def test_eos_leaves_and_min_prob_stop_the_tree(kind):
    """A confident one-word answer: EOS (token 4) at 0.96 after the root. EOS gets no children and the other
    children fall under min_prob, so drafting stops after one level; without them it runs to full depth."""
    table = {(9,): [0.01, 0.01, 0.01, 0.01, 0.96]}
    uniform = lambda path: torch.tensor(table.get(path, [0.2] * 5)).log()  # noqa: E731
    config = TreeConfig(kind, depth=4, topk=3, total_tokens=10, min_prob=0.05)
    tree, frontiers = run_builder(TreeBuilder(config, 9, leaves={4}), uniform)
    assert frontiers == [[0]] and int(tree.num_nodes[0]) == 1 + (3 if kind == "dynamic" else 1)
    _, frontiers = run_builder(TreeBuilder(TreeConfig(kind, depth=4, topk=3, total_tokens=10), 9), uniform)
    assert len(frontiers) == 4
    # EOS alone: the other children (0.01 each) still expand without min_prob, never EOS itself
    _, frontiers = run_builder(TreeBuilder(TreeConfig("dynamic", depth=2, topk=3, total_tokens=10), 9, leaves={4}),
                               uniform)
    assert frontiers[1] and all(node != 1 for node in frontiers[1])      # node 1 is the EOS child (drawn first)


def test_chain_shape():
    table = {(9,): [0.1, 0.7, 0.2], (9, 1): [0.6, 0.3, 0.1], (9, 1, 0): [0.1, 0.1, 0.8]}
    builder = TreeBuilder(TreeConfig("chain", depth=3, topk=8, total_tokens=1), 9)
    tree, frontiers = run_builder(builder, table_logprobs(table))
    assert frontiers == [[0], [1], [2]]
    assert tree.tokens.tolist() == [[9, 1, 0, 2]]
    assert tree.parents.tolist() == [[-1, 0, 1, 2]]


def test_static_shape_rule():
    assert static_shape(depth=3, topk=2, total_tokens=4) == [(0,), (1,), (0, 0), (0, 0, 0)]
    assert len(static_shape(depth=2, topk=3, total_tokens=100)) == 3 + 9  # whole tree when the budget allows


def random_logprobs(seed: int, vocab: int, zero_prob: float = 0.0):
    """A stub drafter: log-probs that depend on the token path, with some tokens of probability 0."""
    def fn(path):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + hash(path) % 1_000_003)
        logits = 2 * torch.randn(vocab, generator=gen)  # [V]
        zero = torch.rand(vocab, generator=gen) < zero_prob  # [V]
        zero[torch.randint(vocab, (1,), generator=gen)] = False  # keep one token possible
        return logits.masked_fill(zero, -math.inf).log_softmax(-1)
    return fn


def test_static_shape_does_not_depend_on_probabilities():
    config = TreeConfig("static", depth=3, topk=3, total_tokens=10)
    trees = [run_builder(TreeBuilder(config, 1), random_logprobs(s, 50))[0] for s in (0, 1)]
    assert not torch.equal(trees[0].tokens, trees[1].tokens)
    assert torch.equal(trees[0].parents, trees[1].parents)
    assert trees[0].num_nodes.item() == 11


@pytest.mark.parametrize("kind", ["chain", "static", "dynamic"])
def test_budget_respected(kind):
    config = TreeConfig(kind, depth=4, topk=3, total_tokens=7)
    tree, _ = run_builder(TreeBuilder(config, 1), random_logprobs(3, 20))
    assert tree.num_nodes.item() == (config.depth if kind == "chain" else config.total_tokens) + 1
    assert tree.depths().max().item() <= config.depth


def token_paths(tree: Tree) -> dict[tuple, list[int]]:
    """token path of each node -> tokens of its children in node order."""
    paths = {}
    for i in range(int(tree.num_nodes[0])):
        path = tuple(tree.tokens[0, tree.path_to(0, i)].tolist())
        paths[path] = tree.tokens[0, tree.children(0, i)].tolist()
    return paths


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["chain", "static", "dynamic"]),
    depth=st.integers(1, 4),
    topk=st.integers(1, 4),
    total=st.integers(1, 12),
    vocab=st.integers(2, 8),
    seed=st.integers(0, 2**16),
)
def test_trees_keep_top_k_prefixes(kind, depth, topk, total, vocab, seed):
    drafter = random_logprobs(seed, vocab, zero_prob=0.3)

    def build(total_tokens):
        config = TreeConfig(kind, depth=depth, topk=topk, total_tokens=total_tokens)
        return run_builder(TreeBuilder(config, 0), drafter)[0]

    tree, full = build(total), build(10_000)  # `full` is never pruned
    parents = tree.parents[0].tolist()
    assert all(parents[i] < i for i in range(1, len(parents)))
    assert tree.num_nodes.item() <= total + 1 or kind == "chain"
    full_children = token_paths(full)
    for path, children in token_paths(tree).items():
        if kind != "static":  # a static tree's shape depends on `total`
            assert children == full_children[path][: len(children)]  # siblings: a prefix of top-k order
        assert len(set(children)) == len(children)
        for token in children:
            assert drafter(path)[token] > -math.inf  # tokens of score -inf are never chosen


def test_tree_config_parse_and_dict():
    assert TreeConfig.parse("kind=dynamic,depth=6,topk=8,total=32") == TreeConfig()
    assert TreeConfig.parse(" kind=chain , depth=4") == TreeConfig("chain", 4, 8, 32)
    config = TreeConfig("static", 3, 2, 9)
    assert TreeConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert TreeConfig.parse("depth=4,min_prob=0.02") == TreeConfig(depth=4, min_prob=0.02)
    assert TreeConfig.from_dict({"kind": "chain", "depth": 2, "topk": 1, "total_tokens": 2}).min_prob == 0


@pytest.mark.parametrize("text", ["kind=foo", "depth=0", "depth=x", "width=3", "depth", "depth=3,depth=4", "",
                                  "topk=-1", "total=1.5", "min_prob=1", "min_prob=-0.1", "min_prob=x"])
def test_tree_config_parse_rejects(text):
    with pytest.raises(ValueError):
        TreeConfig.parse(text)


def test_tree_config_validation():
    with pytest.raises(ValueError, match="depth"):
        TreeConfig(depth=0)
    with pytest.raises(ValueError, match="unknown"):
        TreeConfig.from_dict({"kind": "chain", "width": 3})
