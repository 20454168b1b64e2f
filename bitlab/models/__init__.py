"""BiT GN+WS ResNet-v2 models, their registry and checkpoint formats."""
from bitlab.models.checkpoints import (
    bitlab_to_timm, convert, load_weights, read_state_dict, save_bitlab, save_npz, save_timm, timm_to_bitlab,
)
from bitlab.models.inference import fold_batch_norm, fuse_weight_standardization, prepare_for_inference
from bitlab.models.registry import (
    ARCHITECTURES, FAMILIES, create_model, data_config_of, describe, family_of, list_models, official_names,
    register_family, resolve,
)
from bitlab.models.resnetv2 import PreActBottleneck, ResNetV2, ResNetV2Config, StdConv2d, count_params

__all__ = [
    "ARCHITECTURES", "FAMILIES", "PreActBottleneck", "ResNetV2", "ResNetV2Config", "StdConv2d", "bitlab_to_timm",
    "convert", "count_params", "create_model", "data_config_of", "describe", "family_of", "fold_batch_norm",
    "fuse_weight_standardization", "list_models", "load_weights", "official_names", "prepare_for_inference",
    "read_state_dict", "register_family", "resolve", "save_bitlab", "save_npz", "save_timm", "timm_to_bitlab",
]
