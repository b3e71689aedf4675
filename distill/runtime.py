"""Where and in what precision distill computes: one device rule and one bf16 rule for every
command (train, distil, fine-tune, evaluate).

bf16 autocast is fast only where the hardware has native bf16 arithmetic: a CUDA GPU that
supports it, or a CPU with AVX512-BF16 or AMX. On an AVX2-only CPU PyTorch emulates it and an
epoch was measured 11x slower (190 s vs 17 s), so ``auto`` decides at run time and says why.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import DistillError

__all__ = ["Runtime", "choose_device", "cpu_native_bf16", "resolve_runtime", "torch_threads"]

log = logging.getLogger("distill")

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Runtime:
    """The device and precision one command runs with, and why that precision was chosen."""

    device: torch.device
    bf16: bool
    reason: str


def choose_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise DistillError(f"device {name!r} is not a torch device (auto, cpu, cuda, cuda:1 ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DistillError(f"device {name!r}: no CUDA GPU is available here (use auto or cpu)")
    return dev


def cpu_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[bool, str]:
    """(True, flag) when the CPU lists a native bf16 instruction set, else (False, what it has)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False, "CPU flags unknown (no /proc/cpuinfo)"
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    have = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if have:
        return True, "+".join(have)
    best = next((f for f in ("avx512f", "avx2", "avx", "neon", "asimd") if f in flags), "no SIMD flag")
    return False, f"no avx512_bf16/amx_bf16 ({best} only)"


def resolve_runtime(device: str = "auto", bf16: bool | str = "auto") -> Runtime:
    """Pick the device and decide bf16 (``auto``, ``True`` or ``False``), logging the decision.

    ``auto`` uses bf16 on a GPU that supports it and on a CPU with native bf16, fp32 elsewhere.
    ``True`` on a CPU without native bf16 is honoured with a warning (it is emulated there).
    """
    dev = choose_device(device)
    if dev.type == "cuda":
        native, why = torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(dev)
    elif dev.type == "cpu":
        native, why = cpu_native_bf16()
    else:
        native, why = False, f"device type {dev.type}"
    if bf16 == "auto":
        use, reason = native, f"bf16 auto -> {'bf16' if native else 'fp32'} on {dev.type} ({why})"
        log.info(reason)
    elif bf16 is True:
        use, reason = True, f"bf16 forced on {dev.type} ({why})"
        if not native:
            log.warning("%s: bf16 is emulated here and much slower than fp32; set bf16: auto", reason)
    elif bf16 is False:
        use, reason = False, f"fp32 by setting on {dev.type} ({why})"
        log.info(reason)
    else:
        raise DistillError(f"bf16 must be auto, true or false, not {bf16!r}")
    return Runtime(dev, use, reason)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` (when given) for the block, and restored after it:
    a library call leaves the process-wide setting as it found it."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
