"""ImageNet helpers with dattri's names: data from a folder, ResNet-18, ``train_*`` and ``loss_*``.

There is no ImageNet setting in :mod:`tdabench.benchmark.settings`; these helpers follow
dattri's recipe (SGD lr 0.1, momentum 0.8, weight decay 4e-5, 15 epochs). :class:`ResNet18` is
tdabench's own implementation of the standard ResNet-18 with torchvision's parameter names,
so torchvision ``resnet18`` state dicts load into it. ImageNet is never downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from tdabench.benchmark.datasets._common import (
    per_sample_ce,
    saved_model_values,
    seed_everything,
    train_epochs,
)
from tdabench.errors import DataError

__all__ = [
    "ImageFolderDataset",
    "ResNet18",
    "create_imagenet_dataset",
    "create_resnet18_model",
    "loss_imagenet_resnet18",
    "train_imagenet_resnet18",
]

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_EXTENSIONS = (".jpeg", ".jpg", ".png")


class ImageFolderDataset(Dataset):
    """Images in ``root/<class>/<file>`` (classes and files sorted by name), read lazily.

    Each image is converted to RGB, resized so its shorter side is ``resize`` pixels, centre
    cropped to ``crop`` x ``crop``, scaled to ``[0, 1]`` and standardised with ImageNet's channel
    mean and std (deterministic; dattri uses random crops and flips for both splits).

    Args:
        root: the split's folder.
        resize: shorter side after resizing.
        crop: side of the centre crop.
    """

    def __init__(self, root: str | os.PathLike, resize: int = 256, crop: int = 224) -> None:
        base = Path(root)
        self.classes = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        self.samples = [
            (f, label)
            for label, c in enumerate(self.classes)
            for f in sorted((base / c).iterdir())
            if f.suffix.lower() in _EXTENSIONS
        ]
        if not self.samples:
            raise DataError(f"no images under {str(base)!r}; expected <class>/<image>.JPEG folders")
        self.targets = [label for _, label in self.samples]
        self.resize, self.crop = int(resize), int(crop)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as im:
            img = im.convert("RGB")
        w, h = img.size
        scale = self.resize / min(w, h)
        img = img.resize(
            (max(self.crop, round(w * scale)), max(self.crop, round(h * scale))), Image.BILINEAR
        )
        w, h = img.size
        left, top = (w - self.crop) // 2, (h - self.crop) // 2
        img = img.crop((left, top, left + self.crop, top + self.crop))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = (x - torch.tensor(_MEAN).view(3, 1, 1)) / torch.tensor(_STD).view(3, 1, 1)
        return x, label


def create_imagenet_dataset(
    path: str | os.PathLike,
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The ImageNet training and validation sets from ``path/train`` and ``path/val`` (class folders).

    Raises:
        DataError: the folder is missing (ImageNet must be obtained from image-net.org and
            extracted into ``train/<wnid>/`` and ``val/<wnid>/`` folders), or holds no images.
    """
    root = Path(path)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DataError(
            f"no ImageNet folders under {str(root)!r}: tdabench never downloads. Get ILSVRC-2012 from "
            "image-net.org and extract it as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG there"
        )
    return ImageFolderDataset(root / "train"), ImageFolderDataset(root / "val")


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18 (He et al., 2016) with torchvision's module names; 11,689,512 parameters at 1,000 classes.

    Input ``(B, 3, H, W)``; output logits ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = (64, 128, 256, 512)
        c_in = 64
        for i, w in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(
                self, f"layer{i}", nn.Sequential(_BasicBlock(c_in, w, stride), _BasicBlock(w, w, 1))
            )
            c_in = w
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, 3, H, W)``."""
        h = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def create_resnet18_model() -> ResNet18:
    """A fresh ResNet-18 with 1,000 outputs."""
    return ResNet18()


def train_imagenet_resnet18(
    dataloader: Iterable[Any], seed: int = 0, device: str = "cpu", num_epochs: int = 15
) -> ResNet18:
    """Train :func:`create_resnet18_model` with dattri's recipe (SGD lr 0.1, momentum 0.8, wd 4e-5).

    Args:
        dataloader: yields ``(images (B, 3, H, W), labels (B,))``.
        seed: seeds torch, NumPy and ``random`` before the model is created.
        device: training device.
        num_epochs: passes over the loader.

    Returns:
        The trained model (train mode, on ``device``).
    """
    seed_everything(seed)
    model = create_resnet18_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.8, weight_decay=4e-5)
    return train_epochs(model, dataloader, opt, num_epochs, device, F.cross_entropy)


def loss_imagenet_resnet18(
    model_path: str | os.PathLike, dataloader: Iterable[Any], device: str = "cpu"
) -> float:
    """Mean cross-entropy over every sample of ``dataloader`` (eval mode), as a float.

    (dattri multiplies each batch's summed loss by its batch size before dividing by the number
    of samples; that equals this mean only for batches of one.)
    """
    model = create_resnet18_model()
    losses = saved_model_values(model, model_path, dataloader, device, per_sample_ce)
    return float(losses.mean())
