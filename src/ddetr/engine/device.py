"""Device and mixed-precision choice: one place that turns ``--device``/``--amp`` into something that works here, or
says on one line why not (no GPU, fp16 on a CPU)."""

from __future__ import annotations

import logging
import re

import torch

from ddetr.engine import distributed as dist

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
log = logging.getLogger(__name__)


def valid_device_name(name: str) -> bool:
    return isinstance(name, str) and _DEVICE.fullmatch(name) is not None


def resolve_device(name: str) -> torch.device:
    """``auto`` (a GPU when there is one, else the CPU), ``cpu``, ``cuda`` (under torchrun: this rank's local GPU) or
    ``cuda:N``; a GPU that is not here is refused in one line instead of failing deep inside torch."""
    if not valid_device_name(name):
        raise ValueError(f"--device {name!r}: expected {DEVICE_CHOICES}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    index = int(name.split(":")[1]) if ":" in name else dist.local_rank()
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: GPU {index} does not exist here ({torch.cuda.device_count()} GPU(s))")
    return torch.device("cuda", index)


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 in hardware: CUDA with bf16 support, or a CPU with AMX or AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(check is not None and check() for check in checks)


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` becomes bf16 where it is native (faster there) and none elsewhere (emulated bf16 is slower); fp16 on a
    CPU (emulated, about 20x slower than fp32) and bf16 on a GPU without it are refused; bf16 asked for on a CPU
    without it runs, with a warning."""
    if amp not in AMP_DTYPES and amp != "auto":
        raise ValueError(f"--amp {amp!r}: expected none, bf16, fp16 or auto")
    if amp == "auto":
        return "bf16" if native_bf16(device) else "none"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"--amp fp16 on {device.type}: PyTorch emulates fp16 there (about 20x slower than fp32); "
                         "use --amp bf16, auto or none")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bf16; use --amp fp16 or none")
    if amp == "bf16" and device.type == "cpu" and not native_bf16(device):
        # measured on an AVX2-only AMD EPYC: the demo model's forward (batch 4, 256x341) 0.32 s fp32, 2.2 s bf16
        log.warning("--amp bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so PyTorch emulates it: "
                    "several times slower than fp32 here; --amp auto or none runs fp32")
    return amp
