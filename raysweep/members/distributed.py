"""Members spread over a torch.distributed process group: rank r holds members
[r*n, (r+1)*n) in a local executor and every rank sees the whole ensemble's stacked outputs.

The exchange is exact and needs no backward communication for per-member inputs: each rank
all-gathers the *detached* outputs of every rank, then puts its own outputs (with their graph) back
into its slots. Every rank then computes the same ensemble-level objective on the same numbers,
and backward reaches only its own members' parameters, whose gradient equals the single-process
one (the other slots are constants to it, exactly as they are to its parameters in one process).

Inputs shared by all members (Ensemble-Adv PGD on the averaged output, evaluation) are the one
case where a gradient must cross ranks: the input gradient is the sum of every member's part,
so it is all-reduced (SUM) in backward. Only outputs and input gradients travel, never parameters
(docs/ray_executor.md has the protocol and the byte counts).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class _SumAcrossRanks(torch.autograd.Function):
    """Identity forward; backward all-reduces the input gradient over the group. Every rank runs
    the same backward (same objective, same order), so the collective lines up."""

    @staticmethod
    def forward(ctx, x, members):
        ctx.members = members
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.members.all_reduce(grad.contiguous()), None


class DistributedMembers:
    """This rank's slice of the ensemble. `local` is a LoopedMembers/VmappedMembers of n members;
    `k` the ensemble size (world size * n)."""

    def __init__(self, local, k: int):
        self.local, self.k = local, k
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if local.k * self.world != k:
            raise ValueError(f"{self.world} ranks x {local.k} members per rank != ensemble size {k}")
        self.slots = slice(self.rank * local.k, (self.rank + 1) * local.k)
        self.device = local.device
        # gloo gathers CPU tensors only; NCCL wants them on the device.
        self._via_cpu = dist.get_backend() == "gloo" and self.device.type != "cpu"
        self.bytes_received = 0  # what the collectives delivered to this rank, for benchmarks


    def parameters(self) -> list[torch.Tensor]:
        return self.local.parameters()

    def train(self, mode: bool = True):
        self.local.train(mode)

    def gather(self, mine: torch.Tensor) -> torch.Tensor:
        """[n,...] of this rank's members -> [K,...], own slots keeping their graph."""
        sent = mine.detach().contiguous()
        if self._via_cpu:
            sent = sent.cpu()
        parts = [torch.empty_like(sent) for _ in range(self.world)]
        dist.all_gather(parts, sent)
        self.bytes_received += sent.numel() * sent.element_size() * (self.world - 1)
        parts = [p.to(self.device) for p in parts]
        parts[self.rank] = mine
        return torch.cat(parts)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        self.bytes_received += t.numel() * t.element_size()
        return t

    def sync(self, stacked: torch.Tensor) -> torch.Tensor:
        """A per-member quantity computed here from gathered outputs, valid in this rank's slots only
        (e.g. DEG input gradients), made valid in all slots."""
        return self.gather(stacked[self.slots])

    def stacked_logits(self, x: torch.Tensor, per_member: bool = False, part: str = "logits") -> torch.Tensor:
        if per_member:
            # Other members' input slots are never read here: their ranks feed them.
            return self.gather(self.local.stacked_logits(x[self.slots], True, part))
        if x.requires_grad:
            x = _SumAcrossRanks.apply(x, self)
        return self.gather(self.local.stacked_logits(x, False, part))

    def export_members(self):
        """This rank's members only; the driver assembles the ensemble from every rank's checkpoint."""
        return self.local.export_members()
