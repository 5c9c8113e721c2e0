"""The command line: every subcommand's --help, `generate --json`, and bad input → exit 2 with one clear line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vlmspec import Target, build_drafter, save_drafter
from vlmspec.cli import build_parser, main
from vlmspec.inputs import load_image
from vlmspec.testing import save_tiny_model


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llava"), "llava", lm_head_scale=8.0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 30, 3), dtype=np.uint8))
    rgb.save(folder / "rgb.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("RGBA").save(folder / "alpha.png")
    rgb.convert("LA").save(folder / "gray_alpha.png")
    Image.fromarray(np.arange(24 * 30, dtype=np.uint16).reshape(24, 30) * 60).save(folder / "sixteen.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    return folder


def subcommands() -> list[list[str]]:
    parser = build_parser()
    found = []

    def walk(p, prefix):
        for action in p._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, child in action.choices.items():
                    found.append(prefix + [name])
                    walk(child, prefix + [name])
    walk(parser, [])
    return found


def test_every_subcommand_has_help(capsys):
    commands = subcommands()
    assert ["generate"] in commands
    for command in [[]] + commands:
        with pytest.raises(SystemExit) as exit_info:
            main(command + ["--help"])
        assert exit_info.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_generate_json_has_the_documented_fields(llava_dir, images, capsys):
    code = main(["generate", "--target", str(llava_dir), "--drafter", "eagle", "--image", str(images / "rgb.png"),
                 "--prompt", "<image> what color is the cat?", "--max-new-tokens", "6", "--dtype", "fp32",
                 "--tree", "kind=dynamic,depth=3,topk=2,total=6", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"text", "token_ids", "finish_reason", "stats"}
    for key in ("new_tokens", "target_forwards", "tau", "accepted_by_depth", "draft_seconds", "verify_seconds",
                "seconds"):
        assert key in result["stats"], key
    assert result["stats"]["new_tokens"] == len(result["token_ids"]) == 6


@pytest.mark.parametrize("name", ["rgb.png", "cmyk.jpg", "palette.png", "alpha.png", "gray_alpha.png", "sixteen.png"])
def test_convertible_image_modes_load_as_rgb(images, name):
    image = load_image(images / name)
    assert image.mode == "RGB" and image.size == (30, 24)


def test_alpha_is_composited_on_white():
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(transparent).getpixel((0, 0)) == (255, 255, 255)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def bad_inputs(llava_dir, images, text_dir, other_drafter):
    base = ["generate", "--target", str(llava_dir), "--max-new-tokens", "3"]
    rgb = ["--image", str(images / "rgb.png")]
    return {
        "missing image": (base + ["--image", "/nonexistent.png", "--prompt", "hi"], "image not found"),
        "empty image": (base + ["--image", str(images / "empty.png"), "--prompt", "hi"], "empty"),
        "corrupt image": (base + ["--image", str(images / "corrupt.png"), "--prompt", "hi"], "cannot read image"),
        "too many markers": (base + rgb + ["--prompt", "<image> <image> hi"], "markers"),
        "images for text-only": (["generate", "--target", str(text_dir)] + rgb + ["--prompt", "hi"], "text-only"),
        "empty prompt": (base + rgb + ["--prompt", "  "], "empty"),
        "prompt too long": (base + ["--prompt", "the cat sat " * 1200], "longer than the target's context"),
        "unknown drafter": (base + rgb + ["--prompt", "hi", "--drafter", "nonsense"], "unknown drafter"),
        "drafter for another target": (base + rgb + ["--prompt", "hi", "--drafter", str(other_drafter)],
                                       "trained for a target"),
        "negative temperature": (base + rgb + ["--prompt", "hi", "--temperature", "-1"], "temperature"),
        "top_p zero": (base + rgb + ["--prompt", "hi", "--temperature", "1", "--top-p", "0"], "top_p"),
        "top_p above one": (base + rgb + ["--prompt", "hi", "--temperature", "1", "--top-p", "1.5"], "top_p"),
        "negative top_k": (base + rgb + ["--prompt", "hi", "--top-k", "-1"], "top_k"),
        "zero max tokens": (base[:-1] + ["0"] + rgb + ["--prompt", "hi"], "max_new_tokens"),
        "bad tree": (base + rgb + ["--prompt", "hi", "--tree", "kind=bush"], "tree kind"),
        "unknown dtype": (base + rgb + ["--prompt", "hi", "--dtype", "bf17"], "unknown dtype"),
        "missing target": (["generate", "--target", "/nonexistent", "--prompt", "hi"], "neither a model directory"),
    }


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def other_drafter(tmp_path_factory):
    other = Target.from_pretrained(save_tiny_model(tmp_path_factory.mktemp("wide"), "llava", hidden=96))
    return save_drafter(build_drafter("eagle", other), tmp_path_factory.mktemp("drafter") / "eagle")


def test_bad_inputs_exit_2_with_one_line(llava_dir, images, text_dir, other_drafter, capsys):
    for case, (args, message) in bad_inputs(llava_dir, images, text_dir, other_drafter).items():
        code, err = run_cli(args, capsys)
        assert code == 2, (case, err)
        assert message in err, (case, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (case, err)


def test_cli_process_exits_2_without_traceback(llava_dir):
    process = subprocess.run([sys.executable, "-m", "vlmspec.cli", "generate", "--target", str(llava_dir),
                              "--image", "/nonexistent.png", "--prompt", "hi"], capture_output=True, text=True,
                             timeout=120)
    assert process.returncode == 2
    assert "Traceback" not in process.stderr and "image not found" in process.stderr


def test_checkpoint_round_trip_and_fingerprint_warning(llava_dir, tmp_path):
    target = Target.from_pretrained(llava_dir, dtype=torch.float32)
    drafter = build_drafter("eagle", target, seed=3)
    from vlmspec import load_drafter
    from vlmspec.drafters import recommended_tree
    from vlmspec.tree import TreeConfig

    tree = TreeConfig("dynamic", depth=5, topk=4, total_tokens=20)
    path = save_drafter(drafter, tmp_path / "eagle", tree=tree)
    meta = json.loads((path / "config.json").read_text())
    assert meta["drafter_type"] == "eagle" and meta["target"]["fingerprint"] == target.fingerprint()
    loaded = load_drafter(path, target)
    for (name, a), (_, b) in zip(drafter.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert recommended_tree(path) == tree
    retrained = Target.from_pretrained(save_tiny_model(tmp_path / "retrained", "llava", seed=9))
    with pytest.warns(UserWarning, match="fingerprint"):
        load_drafter(path, retrained)
