"""`--device`: the one parser of a device flag, shared by every command that runs a model."""
from __future__ import annotations

import torch

from bitlab.errors import ConfigError


def parse_device(device: str | torch.device | None) -> torch.device:
    """The torch device `device` names (None: cuda when available, else cpu), refused with a
    ConfigError when torch cannot parse it or names a CUDA device this machine lacks, so that no
    command fails later with torch's RuntimeError ("Found no NVIDIA driver")."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError("device", f"{{setting}} {device}: not a torch device (cpu, cuda, cuda:N, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{{setting}} {device}: no CUDA device here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError("device", f"{{setting}} {device}: no such CUDA device here "
                              f"({torch.cuda.device_count()} visible)")
    return dev
