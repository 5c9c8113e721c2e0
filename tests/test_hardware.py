"""`--dtype fast`: bf16 only where the device computes bf16 natively (a CPU with AVX512-BF16 or AMX, a CUDA GPU with
bf16), else fp32; and the warning that training's bf16 autocast runs emulated. Both CPU answers are simulated by
replacing torch's CPU feature probes, so the test checks each branch on any machine."""

from __future__ import annotations

import warnings

import pytest
import torch

from vlmspec import hardware
from vlmspec.bench.runner import BenchConfig
from vlmspec.hardware import fast_dtype, native_bf16, warn_if_emulated_bf16
from vlmspec.target import Target
from vlmspec.target.families import resolve_dtype
from vlmspec.testing import save_tiny_model


def set_cpu_probes(monkeypatch, **answers: bool) -> None:
    for probe in hardware._CPU_BF16_PROBES:
        monkeypatch.setattr(torch.cpu, probe, lambda answer=answers.get(probe, False): answer, raising=False)


@pytest.fixture(params=[False, True], ids=["no-bf16-cpu", "bf16-cpu"])
def cpu_bf16(request, monkeypatch) -> bool:
    set_cpu_probes(monkeypatch, **{probe: request.param for probe in hardware._CPU_BF16_PROBES})
    return request.param


def test_fast_follows_the_cpu(cpu_bf16, tmp_path):
    expected = torch.bfloat16 if cpu_bf16 else torch.float32
    assert native_bf16("cpu") is cpu_bf16
    assert fast_dtype("cpu") == resolve_dtype("fast") == resolve_dtype("fast", "cpu") == expected
    target = Target.from_pretrained(save_tiny_model(tmp_path, "llava"), dtype="fast")
    assert target.dtype == expected


@pytest.mark.parametrize("probe", hardware._CPU_BF16_PROBES)
def test_either_cpu_feature_is_enough(probe, monkeypatch):
    set_cpu_probes(monkeypatch, **{probe: True})
    assert fast_dtype("cpu") == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer for a CUDA device that is absent")
def test_absent_cuda_is_not_native():
    assert not native_bf16("cuda") and fast_dtype("cuda:0") == torch.float32


def test_dtype_names(tmp_path):
    assert resolve_dtype("checkpoint") is None and resolve_dtype(None) is None
    assert resolve_dtype("fp32") == torch.float32 and resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="use one of fast, checkpoint"):
        resolve_dtype("bf17")
    saved = save_tiny_model(tmp_path, "llava")
    assert Target.from_pretrained(saved, dtype="checkpoint").dtype == Target.from_pretrained(saved).dtype


def test_bench_rejects_a_bad_dtype_before_loading():
    with pytest.raises(ValueError, match="unknown dtype 'bf17'"):
        BenchConfig(suites=("vqa",), dtype="bf17")


def test_training_warns_only_where_bf16_is_emulated(cpu_bf16):
    if cpu_bf16:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warn_if_emulated_bf16("vlmspec train")
    else:
        with pytest.warns(UserWarning, match="vlmspec train: cpu has no native bf16"):
            warn_if_emulated_bf16("vlmspec train")
