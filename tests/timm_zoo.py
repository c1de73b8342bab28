"""timm CNN families used by the timm zoo test and the modern-CNN benchmark (random weights).

name -> (image size, the dense nodes the exact engine reports: where, and only where, the model
has global context; an empty tuple means incremental up to the global tail).
"""

TIMM_ZOO = {
    "regnetx_002": (64, ()),  # BatchNormAct2d: functional BN, x.ndim asserts
    "cspresnet50": (64, ()),
    "hrnet_w18_small": (64, ()),  # Upsample in the multi-resolution fuse layers
    "dpn68": (64, ()),  # channel slices x[:, :c]
    "tf_efficientnet_lite0": (64, ()),  # Conv2dSame: TF "SAME" padding computed from x.size()
    "ghostnet_100": (64, ("mul", "add_3")),  # slices; squeeze-excitation from the third block on
    "mobilenetv3_small_100": (64, ("mul",)),  # squeeze-excitation
    "efficientnet_b0": (64, ("mul",)),
    "rexnet_100": (64, ("mul",)),
    "lcnet_050": (64, ("mul",)),
    "resnest14d": (64, ("mul", "add")),  # split attention: the radix sum is per position, the gate is not
    "convnext_atto": (64, ()),  # channels-last blocks: permute, LayerNorm over channels, permute back
    "convnextv2_atto": (64, ("mul", "add_1", "add_2")),  # GRN: its L2 norm is exact, its gate global
    "resnetblur18": (64, ()),  # BlurPool2d: reflect padding
    "nf_resnet26": (64, ()),  # ScaledStdConv2d: weight standardisation is a function of the weights
    "resnetv2_50x1_bit": (64, ("group_norm",)),  # StdConv2d and GroupNorm (global context)
    "resnet50_gn": (64, ("group_norm",)),
    "tresnet_m": (64, ("mul", "add")),  # SpaceToDepth stem; squeeze-excitation
    "vgg11": (64, ("pre_logits",)),  # ConvMlp: timm registers it as not traceable, kept whole
    "efficientvit_b0": (64, ("stages_2_blocks_1_context_module_main", "add_3")),  # LiteMLA, likewise
}
CI_SUBSET = (
    "regnetx_002",
    "hrnet_w18_small",
    "ghostnet_100",
    "mobilenetv3_small_100",
    "tf_efficientnet_lite0",
    "resnetblur18",
)


def build(name: str):
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10).double().eval()


def with_classic_batch_norm(model):
    """``model`` with every timm ``BatchNormAct2d`` (functional BN, shape asserts) replaced by the
    hand-made equivalent nn.BatchNorm2d -> drop -> act, same statistics: the ceiling to match."""
    from timm.layers import BatchNormAct2d
    from torch import nn

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BatchNormAct2d):
                classic = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine)
                classic.load_state_dict(child.state_dict(), strict=False)
                setattr(
                    parent, name, nn.Sequential(classic, child.drop, child.act).to(child.weight.dtype).eval()
                )
    return model
