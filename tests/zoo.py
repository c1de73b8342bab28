"""torchvision classification models used by the zoo test and the README's support table."""

import torch
import torchvision

# name -> image size (small where the model allows, so CI stays fast)
ZOO = {
    "alexnet": 64,
    "vgg11": 32,
    "vgg16": 32,
    "vgg11_bn": 32,
    "resnet18": 64,
    "resnet50": 64,
    "resnext50_32x4d": 64,
    "wide_resnet50_2": 64,
    "googlenet": 64,
    "inception_v3": 96,
    "inception_v3_aux": 96,  # aux_logits=True, unused in eval
    "densenet121": 64,
    "squeezenet1_0": 64,
    "squeezenet1_1": 64,
    "mobilenet_v2": 64,
    "mobilenet_v3_small": 64,
    "mobilenet_v3_large": 64,
    "mnasnet0_5": 64,
    "shufflenet_v2_x0_5": 64,
    "efficientnet_b0": 64,
    "efficientnet_v2_s": 64,
    "regnet_x_400mf": 64,
    "regnet_y_400mf": 64,
    "convnext_tiny": 64,
}
CI_SUBSET = ("vgg11", "resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5", "googlenet")


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"init_weights": True, "aux_logits": False} if name in ("googlenet", "inception_v3") else {}
    if name == "inception_v3_aux":
        name, kwargs = "inception_v3", {"init_weights": True, "aux_logits": True}
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    return model.double().eval()
