"""Export to and import from the EAGLE-3 layout of the `speculators` format (what vLLM loads).

The format's facts come from its sources, read (not copied) for this project:
- vllm-project/speculators src/speculators/models/eagle3/config.py (Eagle3SpeculatorConfig's fields),
  src/speculators/config.py (SpeculatorsConfig, VerifierConfig), src/speculators/proposals/greedy.py,
  src/speculators/model.py (DraftVocabMixin: d2t offsets, t2d mask), src/speculators/models/eagle3/core.py and
  model_definitions.py (weight names, the 2H-wide first layer);
- vllm-project/vllm vllm/transformers_utils/configs/speculators/algos.py (update_eagle3) and
  vllm/model_executor/models/llama_eagle3.py (the loader: fc over 3 layers, d2t, midlayer → layers.0);
- sgl-project/sglang python/sglang/srt/models/llama_eagle3.py (SGLang's layout: flat config, midlayer.*) and
  python/sglang/srt/models/llama.py (set_eagle3_layers_to_capture: an SGLang layer id is ours - 1).
Where the `speculators` package imports (it pins other transformers versions: install it with --no-deps into a
separate folder on PYTHONPATH), the exported config is validated by its own classes and our drafter is compared
with its own Eagle3DraftModel; otherwise the config is checked against the field list below.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_fixtures import tiny  # noqa: F401  (pytest fixture)

from vlmspec.cli import main
from vlmspec.drafters import build_drafter, load_drafter, recommended_tree, save_drafter
from vlmspec.drafters.layers import causal_mask
from vlmspec.drafters.sglang import save_sglang
from vlmspec.drafters.speculators import check_exportable, save_speculators
from vlmspec.engine import Generator
from vlmspec.target import Target
from vlmspec.testing import random_image
from vlmspec.train.data import CollectedData
from vlmspec.train.losses import LossConfig
from vlmspec.train.trainer import TrainConfig, train
from vlmspec.tree import TreeConfig
from vlmspec.verify import greedy_scores, verify

# Eagle3SpeculatorConfig's fields (speculators src/speculators/models/eagle3/config.py) and the keys vLLM's
# update_eagle3 / SpeculatorsConfig.validate_speculators_config read (vllm .../configs/speculators/algos.py, base.py)
FIELDS = {"speculators_model_type": str, "architectures": list, "transformer_layer_config": dict,
          "draft_vocab_size": int, "norm_before_residual": bool, "target_hidden_size": int,
          "eagle_aux_hidden_state_layer_ids": list, "norm_before_fc": bool, "fc_norm": bool, "norm_output": bool,
          "speculators_config": dict}
LAYER_FIELDS = {"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "hidden_act"}
TREE = TreeConfig(kind="dynamic", depth=4, topk=3, total_tokens=10)


@pytest.fixture(scope="module")
def testbed():
    return Target.from_pretrained("testbed", dtype=torch.float32)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "picture.png"
    random_image(random.Random(3), min_side=64, max_side=96).save(path)
    return path


def speculators_drafter(target, draft_vocab: int = 0, norm_before_residual: bool = False, seed: int = 0):
    """An untrained eagle3 of the speculators layout; a reduced vocabulary is a random set of target ids."""
    drafter = build_drafter("eagle3", target, seed=seed, layout="speculators", draft_vocab=draft_vocab,
                            norm_before_residual=norm_before_residual)
    if draft_vocab:
        ids = torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(seed))[:draft_vocab]
        drafter.set_draft_vocabulary(ids)
    return drafter


def drafted_trees(target, drafter, image, steps: int = 6) -> list[tuple[list[int], list[int]]]:
    """(tokens, parents) of each tree `drafter` proposes over `steps` greedy steps of one generation."""
    state, prefill = target.prefill(target.encode([str(image)], "<image> describe the picture"))
    token = int(prefill.logits[0].argmax())
    draft_state = drafter.begin(target, prefill, token)
    trees = []
    for _ in range(steps):
        tree = drafter.propose(draft_state, TREE, greedy_scores)
        trees.append((tree.tokens[0].tolist(), tree.parents[0].tolist()))
        verified = target.verify(state, tree)
        result = verify(tree, verified.logits)
        path = result.accepted[0, : int(result.num_accepted[0]) + 1].tolist()
        target.commit(state, path)
        drafter.accept(draft_state, tree, path, verified, int(result.bonus[0]))
    return trees


@pytest.mark.parametrize("draft_vocab,norm_before_residual", [(0, False), (300, True)])
def test_round_trip_drafts_the_same_trees(testbed, image, tmp_path, draft_vocab, norm_before_residual):
    drafter = speculators_drafter(testbed, draft_vocab, norm_before_residual, seed=1)
    save_speculators(drafter, tmp_path, "testbed", speculative_tokens=4)
    imported = load_drafter(tmp_path, testbed)
    assert imported.layers == drafter.layers and imported.config.layout == "speculators"
    assert imported.config.norm_before_residual == norm_before_residual
    assert imported.decoder.config.to_dict() == drafter.decoder.config.to_dict()
    assert all(torch.equal(value, imported.state_dict()[name]) for name, value in drafter.state_dict().items())
    ours, theirs = drafted_trees(testbed, drafter, image), drafted_trees(testbed, imported, image)
    assert ours == theirs
    assert max(len(tokens) for tokens, _ in ours) > 1, "the trees should have drafted nodes"
    if draft_vocab:                                   # every drafted token is in the draft vocabulary
        allowed = set(drafter.draft_ids.tolist())
        assert all(token in allowed for tokens, _ in ours for token in tokens[1:])
    assert recommended_tree(tmp_path) == TreeConfig(kind="chain", depth=4)


def test_exported_layout(testbed, tmp_path):
    drafter = speculators_drafter(testbed, draft_vocab=200, norm_before_residual=True)
    save_speculators(drafter, tmp_path, "org/model", speculative_tokens=5)
    config = json.loads((tmp_path / "config.json").read_text())
    for name, kind in FIELDS.items():
        assert isinstance(config[name], kind), name
    assert LAYER_FIELDS <= set(config["transformer_layer_config"])
    assert config["speculators_model_type"] == "eagle3" and config["norm_before_residual"] is True
    assert config["draft_vocab_size"] == 200 and config["target_hidden_size"] == testbed.hidden_size
    assert config["eagle_aux_hidden_state_layer_ids"] == list(drafter.layers) and len(drafter.layers) == 3
    spec = config["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["verifier"]["name_or_path"] == "org/model"
    assert spec["proposal_methods"][0]["speculative_tokens"] == 5
    tensors = load_file(str(tmp_path / "model.safetensors"))
    hidden = testbed.hidden_size
    assert tensors["fc.weight"].shape == (hidden, 3 * hidden)
    assert tensors["layers.0.self_attn.q_proj.weight"].shape[1] == 2 * hidden       # [embedding ; hidden]
    assert tensors["lm_head.weight"].shape == (200, hidden)
    assert torch.equal(tensors["embed_tokens.weight"], testbed.embed_tokens.weight)
    assert {"layers.0.hidden_norm.weight", "norm.weight"} <= set(tensors)
    d2t, t2d = tensors["d2t"], tensors["t2d"]                      # target id = draft id + d2t[draft id]
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool and int(t2d.sum()) == 200
    assert torch.equal(torch.arange(200) + d2t, drafter.draft_ids)
    assert torch.equal(t2d.nonzero().flatten(), drafter.draft_ids)


def test_sglang_layout_round_trip(testbed, image, tmp_path):
    drafter = speculators_drafter(testbed, draft_vocab=300, seed=4)
    save_sglang(drafter, tmp_path, "testbed", 3)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 300
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [i - 1 for i in drafter.layers]
    assert config["hidden_size"] == testbed.hidden_size and config["num_hidden_layers"] == 1
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert "midlayer.self_attn.q_proj.weight" in tensors and not any(k.startswith("layers.") for k in tensors)
    imported = load_drafter(tmp_path, testbed)
    assert imported.layers == drafter.layers
    assert drafted_trees(testbed, drafter, image) == drafted_trees(testbed, imported, image)
    with pytest.raises(ValueError, match="norm_before_residual=true"):
        save_sglang(speculators_drafter(testbed, norm_before_residual=True), tmp_path / "no", "testbed", 3)
    no_ids = edited(tmp_path / "default_ids", tmp_path, lambda c: c.pop("eagle_config"))
    count = testbed.num_layers                        # SGLang's and vLLM's default taps, in our indices
    assert load_drafter(no_ids, testbed).layers == [2, count // 2, count - 3]


def speculators_or_skip():
    try:
        from speculators import SpeculatorModelConfig
        from speculators.models.eagle3 import Eagle3DraftModel
    except Exception as error:                        # not installable beside our pins: see the module docstring
        pytest.skip(f"the speculators package does not import here ({type(error).__name__})")
    return SpeculatorModelConfig, Eagle3DraftModel


def test_config_validates_with_speculators(testbed, tmp_path):
    config_class, _ = speculators_or_skip()
    save_speculators(speculators_drafter(testbed, draft_vocab=100), tmp_path, "testbed", 3)
    config = config_class.from_pretrained(tmp_path)
    assert type(config).__name__ == "Eagle3SpeculatorConfig" and config.draft_vocab_size == 100
    assert config.transformer_layer_config.head_dim == testbed.hidden_size // testbed.text_config.num_attention_heads


@pytest.mark.parametrize("norm_before_residual", [False, True])
def test_same_logits_as_the_speculators_model(testbed, tmp_path, norm_before_residual):
    """Our drafter and speculators' own Eagle3DraftModel, loaded from the exported files, agree on a prompt."""
    config_class, model_class = speculators_or_skip()
    drafter = speculators_drafter(testbed, draft_vocab=300, norm_before_residual=norm_before_residual, seed=2)
    save_speculators(drafter, tmp_path, "testbed", 3)
    config = config_class.from_pretrained(tmp_path)
    config.transformer_layer_config._attn_implementation = "eager"
    reference = model_class(config).eval()
    reference.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)
    assert_same_logits(reference, drafter, testbed, "a red square and a blue circle")


def test_loads_a_checkpoint_written_by_speculators(testbed, tmp_path):
    """A checkpoint saved by speculators' own Eagle3DraftModel (grouped key/value heads, reduced vocabulary, its
    own config spelling) loads as our eagle3 and computes the same logits."""
    config_class, model_class = speculators_or_skip()
    from speculators import SpeculatorsConfig, VerifierConfig
    from speculators.proposals import GreedyTokenProposalConfig
    from transformers import LlamaConfig

    text = testbed.text_config
    layer = LlamaConfig(vocab_size=testbed.vocab_size, hidden_size=testbed.hidden_size, num_hidden_layers=1,
                        intermediate_size=2 * testbed.hidden_size, num_attention_heads=text.num_attention_heads,
                        num_key_value_heads=2, head_dim=testbed.hidden_size // text.num_attention_heads,
                        rms_norm_eps=text.rms_norm_eps, tie_word_embeddings=False)
    layer._attn_implementation = "eager"
    proposal = GreedyTokenProposalConfig(speculative_tokens=4)
    config = config_class.registry["eagle3"](
        transformer_layer_config=layer, draft_vocab_size=300, norm_before_residual=False,
        eagle_aux_hidden_state_layer_ids=[3, 7, 12],
        speculators_config=SpeculatorsConfig(algorithm="eagle3", proposal_methods=[proposal],
                                             default_proposal_method="greedy",
                                             verifier=VerifierConfig(name_or_path=None, architectures=[])))
    torch.manual_seed(0)
    reference = model_class(config).eval()
    ids = torch.randperm(testbed.vocab_size)[:300].sort().values
    with torch.no_grad():
        reference.embed_tokens.weight.copy_(testbed.embed_tokens.weight)
        reference.lm_head.weight.normal_(0, 0.05)
        reference.d2t.copy_(ids - torch.arange(300))
        reference.t2d.zero_()
        reference.t2d[ids] = True
    reference.save_pretrained(tmp_path)
    drafter = load_drafter(tmp_path, testbed)
    assert drafter.layers == [3, 7, 12] and drafter.decoder.config.num_key_value_heads == 2
    assert torch.equal(drafter.draft_ids, ids) and recommended_tree(tmp_path) == TreeConfig(kind="chain", depth=4)
    assert_same_logits(reference, drafter, testbed, "three green triangles")


def assert_same_logits(reference, drafter, testbed, prompt: str) -> None:
    """speculators' Eagle3DraftModel and our drafter give the same draft-vocabulary logits on a prompt's pairs."""
    _, prefill = testbed.prefill(testbed.encode(prompt=prompt))
    tokens, count = prefill.input_ids[:, 1:], prefill.input_ids.shape[1] - 1          # pair i: (f_i, x_{i+1})
    captured = []
    reference.lm_head.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        aux = torch.cat([prefill.hidden_states[layer] for layer in drafter.layers], dim=-1)[:, :-1]
        reference(hidden_states=aux, input_ids=tokens, document_ids=torch.zeros_like(tokens), ttt_steps=1)
        features = drafter(tokens, drafter.input_features(prefill.hidden_states)[:, :-1],
                           torch.arange(count)[None], causal_mask(count, torch.float32))
    torch.testing.assert_close(drafter.vocab_logits(features), captured[0].float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("drafter_type", ["eagle", "msd", "vispec", "flash", "lumen", "prompt-lookup"])
def test_other_types_are_refused_with_what_would_be_lost(testbed, drafter_type):
    with pytest.raises(ValueError, match=f"cannot export a {drafter_type} drafter") as error:
        check_exportable(build_drafter(drafter_type, testbed))
    assert "\n" not in str(error.value)


def test_fc_layout_and_other_fusions_are_refused(testbed):
    with pytest.raises(ValueError, match="layout is 'fc'"):
        check_exportable(load_drafter("testbed:eagle3", testbed))
    with pytest.raises(ValueError, match="exactly 3 target layers"):
        check_exportable(build_drafter("eagle3", testbed, layout="speculators", layers="2,8"))
    with pytest.raises(ValueError, match="exactly 3 target layers"):      # the last post-norm state: not tappable
        check_exportable(build_drafter("eagle3", testbed, layout="speculators", layers="2,8,16"))


def edited(tmp_path, source, config_edit=None, tensor_edit=None):
    """A copy of the checkpoint `source` with its config / tensors changed."""
    config = json.loads((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors"))
    if config_edit:
        config_edit(config)
    if tensor_edit:
        tensor_edit(tensors)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_import_accepts_eagle3_names_and_refuses_what_it_cannot_compute(testbed, tmp_path):
    source = save_speculators(speculators_drafter(testbed, draft_vocab=100), tmp_path / "source", "testbed", 3)
    rename = lambda t: t.update({k.replace("layers.0.", "midlayer."): t.pop(k) for k in list(t) if "layers.0." in k})
    assert load_drafter(edited(tmp_path / "midlayer", source, tensor_edit=rename), testbed).drafter_type == "eagle3"
    cases = {
        "norm_before_residual": lambda c: c.pop("norm_before_residual"),
        "only llama layers": lambda c: c["transformer_layer_config"].update(model_type="qwen3"),
        "fc_norm=true": lambda c: c.update(fc_norm=True),
        "hidden size": lambda c: c.update(target_hidden_size=123),
        "layer ids": lambda c: c.update(eagle_aux_hidden_state_layer_ids=[0, 5, 9]),
        "only eagle3": lambda c: c.update(speculators_model_type="dflash"),
    }
    for message, edit in cases.items():
        with pytest.raises(ValueError, match=message):
            load_drafter(edited(tmp_path / message.replace(" ", "_"), source, edit), testbed)
    tensor_cases = {
        "embedding table": lambda t: t["embed_tokens.weight"].mul_(2),
        "distinct target ids": lambda t: t["d2t"].__setitem__(1, t["d2t"][0] - 1),   # two draft ids, one target id
        "t2d and d2t": lambda t: t["t2d"].logical_not_(),
        "missing": lambda t: t.pop("fc.weight"),
    }
    for message, edit in tensor_cases.items():
        with pytest.raises(ValueError, match=message):
            load_drafter(edited(tmp_path / message.replace(" ", "_"), source, tensor_edit=edit), testbed)


def test_cli_export_then_generate(testbed, tmp_path, capsys):
    saved = save_drafter(speculators_drafter(testbed, draft_vocab=300), tmp_path / "ours",
                         tree=TreeConfig(kind="chain", depth=3))
    out = tmp_path / "exported"
    assert main(["export", "--drafter", str(saved), "--out", str(out), "--verifier", "org/model"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    capsys.readouterr()
    outputs = []
    for drafter in (str(out), "none"):
        assert main(["generate", "--drafter", drafter, "--prompt", "what is in the image?", "--max-new-tokens", "8",
                     "--dtype", "fp32", "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert outputs[0] == outputs[1] and outputs[0]


@pytest.mark.parametrize("args,message", [
    (["--drafter", "testbed:msd"], "cannot export a msd drafter"),
    (["--drafter", "testbed:eagle3"], "layout is 'fc'"),
    (["--drafter", "/no/such/dir"], "not a checkpoint directory"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    assert main(["export", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmspec export: error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0 and "--format" in capsys.readouterr().out


def test_training_chooses_the_most_frequent_tokens_and_stays_lossless(tiny, tmp_path):
    target, _, suite, data = tiny
    losses = []
    drafter = train(target, [data], tmp_path, TrainConfig(
        "eagle3", steps=30, batch_size=2, lr=3e-3, warmup=2, bf16=False, seed=1,
        drafter_options={"layout": "speculators", "draft_vocab": 40}),
        progress=False, on_step=lambda step, metrics: losses.append(metrics["loss"]))
    counts = CollectedData([data], drafter.feature_layers(), target).answer_token_counts(target.vocab_size)
    chosen = set(drafter.draft_ids.tolist())
    assert min(int(counts[token]) for token in chosen) >= max(int(counts[token]) for token in
                                                              set(range(target.vocab_size)) - chosen)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    reloaded = load_drafter(tmp_path, target)
    assert torch.equal(reloaded.draft_ids, drafter.draft_ids)
    plain = Generator(target).generate(prompt="how are you", max_new_tokens=12)
    result = Generator(target, reloaded.eval(), TREE).generate(prompt="how are you", max_new_tokens=12)
    assert result.token_ids == plain.token_ids


@pytest.mark.parametrize("options", ["", "feature_noise=0.1", "ranking_weight=0.5", "self_correction=true",
                                     "sampled_token=true", "steps=3,kv_consistency_weight=0.5"])
def test_every_loss_option_trains_the_speculators_layout(tiny, options):
    target, _, _, data = tiny
    drafter = build_drafter("eagle3", target, layout="speculators").float().train()
    config = LossConfig.parse(options, drafter.default_loss_config())
    loss, metrics = drafter.training_loss(CollectedData([data], drafter.feature_layers(), target).batch([0, 3, 5]),
                                          config)
    loss.backward()
    assert torch.isfinite(loss) and f"acc@{config.steps}" in metrics
    assert drafter.lm_head.weight.grad.abs().sum() > 0 and drafter.fuse.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="feature_weight=0"):
        drafter.training_loss(CollectedData([data], drafter.feature_layers(), target).batch([0]),
                              LossConfig.parse("feature_weight=0.5", config))
