"""Local executors: all K members in one process, looped or vectorised with torch.func.

Both give the same numbers. Which is faster depends on the device: on a 2-core CPU the loop is
faster for LeNet-size members, on CUDA vmap (benchmarks/bench_members.py measures it; README's
benchmark table has the figures), so `auto` loops on CPU and vmaps on CUDA.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from raysweep.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("executor.device: 'cuda' asked for but no CUDA device is visible; use 'cpu' or 'auto'")
    return torch.device(name)


def _has_batchnorm(m: nn.Module) -> bool:
    return any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class LoopedMembers:
    """One forward per member. Works for any architecture, BatchNorm included. `channels_last`: conv
    weights and image inputs in NHWC layout (same numbers, other kernels); `compile`: each member's
    forward through torch.compile (the members themselves stay plain modules: export, state_dict)."""

    def __init__(self, members: list[nn.Module], device: torch.device, channels_last: bool = False,
                 compile: bool = False):
        fmt = torch.channels_last if channels_last else torch.preserve_format
        self.members = [m.to(device, memory_format=fmt) for m in members]
        self.device, self.channels_last = device, channels_last
        self._forwards = [torch.compile(m) for m in self.members] if compile else self.members

    @property
    def k(self) -> int:
        return len(self.members)

    def parameters(self) -> list[torch.Tensor]:
        """The trainable tensors (frozen parts, e.g. of meta-composites, excluded)."""
        return [p for m in self.members for p in m.parameters() if p.requires_grad]

    def train(self, mode: bool = True):
        for m in self.members:
            m.train(mode)

    def stacked_logits(self, x: torch.Tensor, per_member: bool = False, part: str = "logits") -> torch.Tensor:
        """x [B,...] seen by every member, or [K,B,...] with member k on x[k] (per_member).
        part='features' returns last hidden activations [K,B,D]; part='head' maps [K,B,D] to logits."""
        layout = _nhwc if self.channels_last else (lambda t: t)
        return torch.stack([m(layout(x[i] if per_member else x), part) for i, m in enumerate(self._forwards)])

    def export_members(self) -> list[nn.Module]:
        return self.members

    def sync(self, stacked: torch.Tensor) -> torch.Tensor:
        """Every member lives here, so every slot of a stacked quantity is already valid."""
        return stacked


class VmappedMembers:
    """Members' parameters stacked into [K,...] leaves and run as one vmapped call (`compile`: that
    call through torch.compile)."""

    def __init__(self, members: list[nn.Module], device: torch.device, compile: bool = False):
        if _has_batchnorm(members[0]):
            raise ConfigError("executor.vectorize: 'vmap' needs members without BatchNorm (in-place running "
                              "statistics cannot be vmapped); use 'loop' or 'auto'")
        self.members = [m.to(device) for m in members]
        self.device = device
        self.params, self.buffers = stack_module_state(self.members)
        self._base = copy.deepcopy(self.members[0]).to("meta")
        self._compile, self._calls = compile, {}

    @property
    def k(self) -> int:
        return len(self.members)

    def parameters(self) -> list[torch.Tensor]:
        return [p for p in self.params.values() if p.requires_grad]

    def train(self, mode: bool = True):
        self._base.train(mode)
        for m in self.members:
            m.train(mode)

    def _vmapped(self, per_member: bool, part: str):
        key = (per_member, part)
        if key not in self._calls:
            def call(params, buffers, inp):
                return functional_call(self._base, (params, buffers), (inp, part))

            fn = torch.vmap(call, in_dims=(0, 0, 0 if per_member else None), randomness="different")
            self._calls[key] = torch.compile(fn) if self._compile else fn
        return self._calls[key]

    def stacked_logits(self, x: torch.Tensor, per_member: bool = False, part: str = "logits") -> torch.Tensor:
        return self._vmapped(per_member, part)(self.params, self.buffers, x)

    def sync(self, stacked: torch.Tensor) -> torch.Tensor:
        """Every member lives here, so every slot of a stacked quantity is already valid."""
        return stacked

    @torch.no_grad()
    def export_members(self) -> list[nn.Module]:
        """The member modules with the trained stacked parameters copied back into them."""
        for k, m in enumerate(self.members):
            for name, p in m.named_parameters():
                p.copy_(self.params[name][k])
        return self.members


def make_local_executor(members: list[nn.Module], vectorize: str = "auto", device: str = "auto",
                        channels_last: bool | str = "auto", compile: bool = False):
    dev = resolve_device(device)
    if channels_last == "auto":
        # Measured on CPU (docs/performance.md): NHWC takes oneDNN's convolutions, 1.2-2.6x faster for
        # LeNet-5 and small_cnn (attack steps gain most), neutral to slightly slower for ResNet-18 (BatchNorm).
        # On CUDA it was not measured faster for these small members, and vmap has no NHWC layout.
        channels_last = dev.type == "cpu" and vectorize != "vmap" and not _has_batchnorm(members[0])
    if dev.type == "cuda":
        # fp32 means fp32: with PyTorch's default TF32 convolutions, vmapped and looped members differ by
        # up to 2e-4 in gradients on an H200 (benchmarks/GPU_RESULTS.md); without TF32, by 1e-8.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if vectorize == "auto":
        vmap = dev.type == "cuda" and not _has_batchnorm(members[0]) and not channels_last
        vectorize = "vmap" if vmap else "loop"
    if vectorize == "vmap":
        return VmappedMembers(members, dev, compile)
    return LoopedMembers(members, dev, channels_last, compile)
