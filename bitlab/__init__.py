"""bitlab: Big Transfer (BiT) as software.

    import bitlab
    model = bitlab.create_model("BiT-M-R50x1", num_classes=10, zero_head=True)  # official weights, cached on first use
"""
import importlib
import importlib.util

from bitlab.errors import BitlabError

__version__ = "0.1.0"
__all__ = ["BitlabError", "__version__", "create_model", "list_models"]


def __getattr__(name: str):
    # Lazy, so that `bitlab --help` and light imports do not pay for importing torch.
    if name in ("create_model", "list_models"):
        from bitlab import models

        return getattr(models, name)
    # Submodules too (`bitlab.hyperrule`, `bitlab.report`, ... as the README writes them), imported
    # on first use; a name that is no submodule stays an AttributeError.
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'bitlab' has no attribute {name!r}")
