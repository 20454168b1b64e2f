"""torchrun's environment as the CLI needs it before and after the process group (no torch import)."""
import os


def under_torchrun() -> bool:
    """This process is a torchrun (torch.distributed.elastic) worker."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ


def env_rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)
