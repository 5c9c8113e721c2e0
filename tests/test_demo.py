"""`vlmspec demo`: end to end on the shipped testbed (when its weights are present), on a tiny random model of the
testbed's architecture standing in for it, and the one-line error when the weights are missing."""

from __future__ import annotations

import pytest

import vlmspec.testbed
from vlmspec import demo
from vlmspec.cli import main
from vlmspec.hardware import native_bf16


def shipped_weights_present() -> bool:
    try:
        vlmspec.testbed.shipped_path()
        return True
    except ValueError:
        return False


def check_demo_output(text: str, report) -> None:
    assert "Q (" in text and "A (" in text
    dtype = "bf16" if native_bf16("cpu") else "fp32"                  # `--dtype fast`, said and used
    assert f"dtype {dtype}:" in text and f"torch.{'bfloat16' if dtype == 'bf16' else 'float32'}" in (
        report / "report.md").read_text()
    assert "plain decoding" in text and "speculative (" in text and "speedup" in text
    assert str(report / "report.md") in text
    for name in ("records.jsonl", "summary.json", "report.md", "speedup.png"):
        assert (report / name).is_file()


@pytest.mark.skipif(not shipped_weights_present(), reason="the shipped testbed weights are not in the package yet "
                                                          "(src/vlmspec/testbed/weights)")
def test_demo_on_the_shipped_testbed(tmp_path):
    pieces: list[str] = []
    report = demo.run_demo(tmp_path / "demo", max_new_tokens=24, write=pieces.append)
    check_demo_output("".join(pieces), report)


@pytest.fixture
def tiny_testbed(tmp_path, monkeypatch):
    """A random-init model of the testbed's architecture (TINY sizes) in place of the shipped weights."""
    from vlmspec.testbed.model import TINY, build_model, build_processor, corpus, train_tokenizer

    tokenizer = train_tokenizer(TINY.vocab_size, corpus(n=200))
    folder = tmp_path / "weights"
    build_model(TINY, tokenizer).save_pretrained(folder)
    build_processor(tokenizer).save_pretrained(folder)
    monkeypatch.setattr(vlmspec.testbed, "SHIPPED_DIR", folder)
    monkeypatch.setattr(demo, "shipped_drafters", lambda: [])
    monkeypatch.setattr(demo, "shipped_summary", lambda: None)
    return folder


def test_demo_end_to_end_on_a_stand_in_testbed(tiny_testbed, tmp_path):
    pieces: list[str] = []
    report = demo.run_demo(tmp_path / "demo", max_new_tokens=8, write=pieces.append)
    text = "".join(pieces)
    check_demo_output(text, report)
    assert "UNTRAINED eagle" in text
    demo.run_demo(tmp_path / "demo", max_new_tokens=8, write=pieces.append)   # runs again in the same folder


def test_demo_without_weights_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vlmspec.testbed, "SHIPPED_DIR", tmp_path / "empty")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "testbed weights are missing" in err


def test_drafter_choice_follows_the_shipped_summary():
    summary = {"across_suites": [
        {"arm": "testbed:eagle", "temperature": 0.0, "speedup_geomean": 1.4},
        {"arm": "testbed:other", "temperature": 0.0, "speedup_geomean": 1.9},
        {"arm": "testbed:other", "temperature": 1.0, "speedup_geomean": 3.0},
        {"arm": "testbed:gone", "temperature": 0.0, "speedup_geomean": 5.0}]}
    name, reason = demo.choose_drafter(["testbed:eagle", "testbed:other"], summary)
    assert name == "testbed:other" and "1.90x" in reason
    assert demo.choose_drafter(["testbed:eagle"], None)[0] == "testbed:eagle"
    name, reason = demo.choose_drafter([], summary)
    assert name == "eagle" and "UNTRAINED" in reason
