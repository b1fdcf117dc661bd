"""Where tensors live: --device (auto|cpu|cuda[:N]) and --dtype parsing and checks, torch only."""

from __future__ import annotations

import argparse
import re

import torch

from sap_common.errors import SapError

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N"
# The float dtypes, for compute (--dtype) and on the wire (--wire-dtype); float32 is lossless on the wire.
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
            raise DeviceUnavailableError(
                f"--device {spec}: CUDA is not available on this machine ({build}); use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceUnavailableError(
                f"--device {spec}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
            )
    return device


# --- a top spread over several devices (sap-server --device-map balanced) ---------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_max_memory(text: str) -> dict[torch.device, int]:
    """'cuda:0=20GiB,cuda:1=20GiB,cpu=64GiB' -> {device: bytes}, in the order given (the blocks' order)."""
    budget: dict[torch.device, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, size = item.partition("=")
        try:
            device = torch.device(device_arg(name.strip()))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--max-memory {item!r}: the device {exc}") from None
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)
        match = _SIZE.match(size)
        if match is None:
            raise ValueError(f"--max-memory {item!r}: expected DEVICE=SIZE, e.g. cuda:0=20GiB")
        if device in budget:
            raise ValueError(f"--max-memory names {device} twice")
        budget[device] = int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
    if not budget:
        raise ValueError("--max-memory is empty; expected e.g. cuda:0=20GiB,cuda:1=20GiB")
    return budget


def default_max_memory() -> dict[torch.device, int]:
    """Every visible GPU with 90 % of its free memory (the rest for activations and other sessions); the
    CPU alone (unbounded) when there is none."""
    if not torch.cuda.is_available():
        return {torch.device("cpu"): 2**62}
    budget = {}
    for index in range(torch.cuda.device_count()):
        free, _total = torch.cuda.mem_get_info(index)
        budget[torch.device("cuda", index)] = int(free * 0.9)
    return budget


def plan_blocks(sizes: list[int], budget: dict[torch.device, int]) -> list[torch.device]:
    """Assign blocks (their sizes in bytes, in order) to the budget's devices in order, contiguously: each
    device takes about an equal share of the total (a balanced pipeline, like transformers'
    device_map="balanced"), never more than its budget; a device runs out, the next takes over.
    Raises ValueError when the blocks do not fit."""
    devices = list(budget)
    if not devices:
        raise ValueError("no device to place the blocks on")
    total = sum(sizes)
    share = total / len(devices)
    plan: list[torch.device] = []
    index, used = 0, 0
    for size in sizes:
        # move on when this device is full, or has its share and later devices can take the rest
        while index < len(devices) and (
            used + size > budget[devices[index]] or (used > 0 and used + size / 2 > share and index + 1 < len(devices))
        ):
            index, used = index + 1, 0
        if index == len(devices):
            raise ValueError(
                f"the top's blocks ({total / 2**20:.0f} MiB) do not fit the memory budget "
                f"({', '.join(f'{d}={b / 2**20:.0f} MiB' for d, b in budget.items())})"
            )
        plan.append(devices[index])
        used += size
    return plan
