"""Models and inputs for the README's signal and volume examples of ``kfx explain``.

    python examples/models_nd.py        # writes scan.nii.gz (a 32^3 volume) and ecg.npy (12 x 1000)
    PYTHONPATH=. kfx explain scan.nii.gz --model examples.models_nd:volume_resnet10 --patch 8 --stride 4
    PYTHONPATH=. kfx explain ecg.npy --model examples.models_nd:ecg_cnn --patch 50 --stride 25

The factories take no arguments (as ``--model package.module:factory`` needs) and build their
networks with fixed random weights: the maps show what kfx draws, not a trained model's reasoning.
Give ``--weights FILE`` (a state_dict) for trained ones. ``volume_resnet10`` needs MONAI
(``pip install "kfx[medical]"``); nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

LEADS = 12


def volume_resnet10() -> nn.Module:
    """MONAI's 3-D ResNet-10 for one-channel volumes [1, D, H, W], two classes."""
    from monai.networks.nets import resnet10

    torch.manual_seed(0)
    return resnet10(spatial_dims=3, n_input_channels=1, num_classes=2).eval()


def ecg_cnn() -> nn.Module:
    """A small 1-D CNN for 12-lead signals [12, L] (e.g. ECGs), five classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(LEADS, 32, 15, stride=2, padding=7),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.MaxPool1d(3, stride=2, padding=1),
        nn.Conv1d(32, 64, 7, stride=2, padding=3),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Conv1d(64, 64, 7, padding=3),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(64, 5),
    ).eval()


def synthetic_scan(side: int = 32) -> np.ndarray:
    """A volume [side]^3 of noise with a bright sphere off the centre (float32)."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*(np.arange(side),) * 3, indexing="ij"))
    centre = np.array([0.6, 0.4, 0.5])[:, None, None, None] * side
    sphere = (((grid - centre) ** 2).sum(0) < (side / 6) ** 2).astype(np.float32)
    return (sphere + 0.1 * rng.standard_normal((side,) * 3)).astype(np.float32)


def synthetic_ecg(length: int = 1000) -> np.ndarray:
    """Twelve leads [12, length] of a 1 Hz beat at 250 Hz with noise (float32)."""
    rng = np.random.default_rng(0)
    t = np.arange(length) / 250.0
    beat = np.exp(-(((t % 1.0) - 0.3) ** 2) / 0.0005)
    gains = rng.uniform(0.3, 1.0, (LEADS, 1))
    return (gains * beat + 0.05 * rng.standard_normal((LEADS, length))).astype(np.float32)


def main() -> None:
    import nibabel

    affine = np.diag([2.0, 2.0, 2.5, 1.0])  # 2 x 2 x 2.5 mm voxels
    nibabel.save(nibabel.Nifti1Image(synthetic_scan(), affine), "scan.nii.gz")
    np.save("ecg.npy", synthetic_ecg())
    print("wrote scan.nii.gz [32, 32, 32] and ecg.npy [12, 1000]")


if __name__ == "__main__":
    main()
