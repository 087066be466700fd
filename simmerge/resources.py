"""What this process may use of the machine, for the code that splits work across cores."""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_device(device: str) -> str:
    """`device` if this process can run on it: `cpu`, or `cuda[:N]` with that GPU present. Anything
    else (`tpu`, `cuda:x`) is an error naming it, not a RuntimeError from deep inside torch."""
    import re

    from simmerge.errors import SimMergeError

    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):
        raise SimMergeError(f"unknown device {device!r}; use cpu or cuda[:N]")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SimMergeError(f"device {device!r} requested but CUDA is not available")
        index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise SimMergeError(f"device {device!r} does not exist ({count} CUDA devices)")
    return device


def device_option_callback(_ctx: object, _param: object, value: str) -> str:
    """click callback: check `--device` while parsing, before any work starts."""
    return check_device(value)
