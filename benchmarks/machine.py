"""What machine a benchmark ran on, and waiting for it to be quiet before timing.

The development machines are shared: other jobs' load moves CPU timings by 0.7-1.9x in both
directions (benchmarks/RESULTS.md), so the CPU benchmarks wait until the 1-minute load average is
below a threshold, interleave what they compare and report the load they saw.
"""
from __future__ import annotations

import logging
import os
import platform
import time

import torch

log = logging.getLogger(__name__)


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction sets that decide oneDNN's convolution kernels on x86.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def cpu_flags() -> list[str]:
    """Which of `ISA_FLAGS` the CPU has (from /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in ISA_FLAGS if flag in flags]


def describe(device: torch.device) -> dict:
    """The machine, for a benchmark's JSON line."""
    info = {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def wait_until_quiet(threshold: float, poll_s: float = 60.0, limit_s: float = 1800.0) -> float:
    """Block until the 1-minute load average is below `threshold` (checked every `poll_s`), at most
    `limit_s`; returns the load then. A machine that never got quiet is timed anyway (and says so)."""
    start = time.monotonic()
    while (load := os.getloadavg()[0]) >= threshold and time.monotonic() - start < limit_s:
        log.warning("load average %.2f >= %.2f: waiting %.0f s before timing", load, threshold, poll_s)
        time.sleep(poll_s)
    if load >= threshold:
        log.warning("load average still %.2f after %.0f s: timing on a busy machine", load, limit_s)
    return load
