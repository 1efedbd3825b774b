"""Member architectures. Each model takes images in [0,1] and normalises inside, so attacks work
in pixel space. `features(x)` returns the last hidden layer (after ReLU) and `head` maps it to
logits: the methods that need penultimate features (PDD, meta-composites) use that split.
"""
from __future__ import annotations

import torch
from torch import nn


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

    def forward(self, x):
        return self.head(self.features(x))


def _flat_dim(body: nn.Module, image_shape) -> int:
    with torch.no_grad():
        return body(torch.zeros(1, *image_shape)).shape[1]


def lenet5(image_shape, num_classes, mean, std) -> Member:
    c, h, _ = image_shape
    convs = nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2 if h == 28 else 0), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    d = _flat_dim(convs, image_shape)
    body = nn.Sequential(convs, nn.Linear(d, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
    return Member(Normalize(mean, std), body, nn.Linear(84, num_classes))


def small_cnn(image_shape, num_classes, mean, std) -> Member:
    c = image_shape[0]
    convs = nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    body = nn.Sequential(convs, nn.Linear(_flat_dim(convs, image_shape), 128), nn.ReLU())
    return Member(Normalize(mean, std), body, nn.Linear(128, num_classes))


def resnet18(image_shape, num_classes, mean, std) -> Member:
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(num_classes=num_classes)
    # Small images: the CIFAR stem (3x3 stride 1, no max-pool) keeps spatial resolution.
    net.conv1 = nn.Conv2d(image_shape[0], 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    head, net.fc = net.fc, nn.Identity()
    return Member(Normalize(mean, std), net, head)


ARCHS = {"lenet5": lenet5, "small_cnn": small_cnn, "resnet18": resnet18}


def build_member(arch: str, image_shape, num_classes, mean, std) -> Member:
    return ARCHS[arch](tuple(image_shape), num_classes, mean, std)
