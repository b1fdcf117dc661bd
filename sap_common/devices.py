"""Where tensors live: --device (auto|cpu|cuda[:N]) and --dtype parsing and checks, torch only."""

from __future__ import annotations

import argparse
import re

import torch

from sap_common.errors import SapError

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceUnavailableError(SapError):
    """The device asked for does not exist on this machine (no CUDA, or no GPU with that index)."""


def device_arg(value: str) -> str:
    """argparse type for --device: checks the spelling only (availability is checked by resolve_device)."""
    spec = value.strip().lower()
    if not _DEVICE.match(spec):
        raise argparse.ArgumentTypeError(f"must be one of {DEVICE_CHOICES}, got {value!r}")
    return spec


def dtype_arg(value: str) -> str:
    """argparse type for --dtype."""
    if value not in DTYPES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DTYPES)}, got {value!r}")
    return value


def resolve_device(spec: str) -> torch.device:
    """auto -> cuda when torch sees a GPU, else cpu; cuda[:N] must exist (DeviceUnavailableError if not)."""
    spec = device_arg(spec) if isinstance(spec, str) else spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
            raise DeviceUnavailableError(f"--device {spec}: CUDA is not available on this machine ({build}); "
                                         f"use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceUnavailableError(f"--device {spec}: this machine has {count} CUDA device(s), "
                                         f"cuda:0..cuda:{count - 1}")
    return device
