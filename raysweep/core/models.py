"""Member architectures. Each model takes images in [0,1] and normalises inside, so attacks work
in pixel space. `features(x)` returns the last hidden layer (after ReLU) and `head` maps it to
logits: the methods that need penultimate features (PDD, meta-composites) use that split.
"""
from __future__ import annotations

import torch
from torch import nn

from raysweep.errors import ConfigError


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class Member(nn.Module):
    def __init__(self, normalize: Normalize, body: nn.Module, head: nn.Module):
        super().__init__()
        self.normalize, self.body, self.head = normalize, body, head

    def features(self, x):
        return self.body(self.normalize(x))

    def forward(self, x, part: str = "logits"):
        """part='features' stops at the last hidden layer; part='head' maps features to logits.
        One entry point, so torch.func.functional_call can run each part vmapped."""
        if part == "features":
            return self.features(x)
        if part == "head":
            return self.head(x)
        return self.head(self.features(x))


def _flat_dim(body: nn.Module, image_shape) -> int:
    with torch.no_grad():
        return body(torch.zeros(1, *image_shape)).shape[1]


def _w(n: int, width: float) -> int:
    return max(1, round(n * width))


def lenet5(image_shape, num_classes, mean, std, width: float = 1.0) -> Member:
    c, h, _ = image_shape
    c1, c2, f1, f2 = (_w(n, width) for n in (6, 16, 120, 84))
    convs = nn.Sequential(
        nn.Conv2d(c, c1, 5, padding=2 if h == 28 else 0), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    d = _flat_dim(convs, image_shape)
    body = nn.Sequential(convs, nn.Linear(d, f1), nn.ReLU(), nn.Linear(f1, f2), nn.ReLU())
    return Member(Normalize(mean, std), body, nn.Linear(f2, num_classes))


def small_cnn(image_shape, num_classes, mean, std, width: float = 1.0) -> Member:
    c = image_shape[0]
    c1, c2, f1 = (_w(n, width) for n in (32, 64, 128))
    convs = nn.Sequential(
        nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    body = nn.Sequential(convs, nn.Linear(_flat_dim(convs, image_shape), f1), nn.ReLU())
    return Member(Normalize(mean, std), body, nn.Linear(f1, num_classes))


def resnet18(image_shape, num_classes, mean, std, width: float = 1.0) -> Member:
    if width != 1.0:
        raise ConfigError(f"model.width: resnet18 has a fixed width, got {width}; use lenet5 or small_cnn to scale width")
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(num_classes=num_classes)
    # Small images: the CIFAR stem (3x3 stride 1, no max-pool) keeps spatial resolution.
    net.conv1 = nn.Conv2d(image_shape[0], 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    head, net.fc = net.fc, nn.Identity()
    return Member(Normalize(mean, std), net, head)


ARCHS = {"lenet5": lenet5, "small_cnn": small_cnn, "resnet18": resnet18}


def build_member(arch: str, image_shape, num_classes, mean, std, width: float = 1.0) -> Member:
    try:
        return ARCHS[arch](tuple(image_shape), num_classes, mean, std, width)
    except RuntimeError as err:  # a convolution larger than what is left of the image
        raise ConfigError(f"model.arch {arch}: images of shape {list(image_shape)} are too small for it "
                          f"({str(err).splitlines()[0]}); use small_cnn or larger images") from None
