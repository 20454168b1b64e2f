"""bitlab: Big Transfer (BiT) as software.

    import bitlab
    model = bitlab.create_model("BiT-M-R50x1", num_classes=10, pretrained="BiT-M-R50x1.npz", zero_head=True)
"""
from bitlab.errors import BitlabError
from bitlab.models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["BitlabError", "__version__", "create_model", "list_models"]
