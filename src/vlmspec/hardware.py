"""Whether a device computes bf16 in hardware, and so which dtype decodes fastest there.

bf16 pays off only where matrix units compute it: a CUDA GPU with native bf16, or a CPU with AVX512-BF16 or AMX.
Elsewhere PyTorch emulates it, and slowly: on a 2-core AVX2 CPU a 512 x 512 bf16 matmul took 60-75x as long as in
fp32, and the testbed's 16-token forward cost 3.0-3.6x one token in bf16 against 1.7-2.0x in fp32
(docs/benchmarks.md, "bf16 without bf16 hardware"): the first-round testbed drafters lost to plain decoding in
bf16 there and won in fp32.
"""

from __future__ import annotations

import warnings

import torch

# torch.cpu's CPU feature probes (cpuinfo); a torch without one of them answers False, i.e. fp32.
_CPU_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """True on a CUDA device with native bf16 and on a CPU with AVX512-BF16 or AMX; False elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in _CPU_BF16_PROBES)
    return False


def fast_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The decoding dtype `--dtype fast` means: bf16 where the device computes it natively, else fp32."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def warn_if_emulated_bf16(what: str, device: str | torch.device = "cpu") -> None:
    """Warn that `what` (bf16 autocast) will run emulated, several times slower, on this device."""
    if not native_bf16(device):
        warnings.warn(f"{what}: {torch.device(device).type} has no native bf16 (no AVX512-BF16 or AMX on a CPU), so "
                      "bf16 autocast runs emulated and several times slower than on bf16 hardware (measured on a "
                      "2-core AVX2 CPU: a vision step of testbed build 12 s against 0.35 s; docs/testbed.md)", stacklevel=3)
