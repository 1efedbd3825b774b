"""The regulariser plug-in point: a term added to the training loss, computed from the members'
stacked outputs. One file per regulariser holds its config section (`train.<key>`), what it needs,
whether it is a defence, and its term; `@register` makes the config schema, its cross-field rules,
the training step and type-I transfer surrogates see it. Nothing else is edited to add one.

A term is one of two kinds, told apart by its shape:
  * per member, [K] (JR: each member's own penalty): a distributed executor computes only its own
    members' entries, so the step makes the vector whole across ranks, then sums it;
  * ensemble-level, a scalar computed from the stacked logits (ADP), or from per-member input
    gradients that the step hands over already whole (`StepOutputs.member_input_grads`, DEG).
So a regulariser never talks to the executor: where the members live is the executor's business,
and every executor gives the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch

from raysweep.core.registry import Registry
from raysweep.core.sections import Section

REGULARISERS = Registry("regulariser", "key")
register = REGULARISERS.register  # class decorator: `cls.key` becomes the section train.<key> of every config
                                  # validated from then on


@dataclass
class StepOutputs:
    """What a term sees of one pass of the training step."""
    logits: torch.Tensor  # [K,B,C], member k's logits on x[k]
    x: torch.Tensor  # [K,B,...] the pass's inputs; they require grad when a regulariser needs_input_grad
    y: torch.Tensor  # [K,B]
    weights: torch.Tensor  # [K] the members' convex weights
    generator: torch.Generator
    member_input_grads: Callable[[], torch.Tensor]  # [K,B,D] d CE(f_k(x_k), y_k) / d x_k, whole, with graph


class Regulariser:
    """Subclass, set the class attributes, implement `term` (or `features` for a feature transform)."""
    key: ClassVar[str]  # the config section train.<key>
    Config: ClassVar[type[Section]]
    default: ClassVar[Optional[Section]] = None  # the section when a config has none; None = off
    joint: ClassVar[bool] = True  # couples members: needs an ensemble method whose members share mini-batches
    min_k: ClassVar[int] = 2
    defence: ClassVar[bool] = True  # type-I (oblivious) transfer surrogates train without it
    transforms_features: ClassVar[bool] = False  # `features` rewrites the last hidden features (PDD)

    def __init__(self, cfg: Section, k: int):
        self.cfg, self.k = cfg, k

    @classmethod
    def enabled(cls, cfg: Optional[Section]) -> bool:
        """Whether a config section switches the term on (a present section, by default)."""
        return cfg is not None

    @classmethod
    def check(cls, cfg: Section, k: int) -> None:
        """Rules tying the section to the rest of the run, beyond `joint` and `min_k`; raise ValueError."""

    @property
    def needs_input_grad(self) -> bool:
        """The step makes the pass's inputs require grad (an input-gradient term)."""
        return False

    def forward(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                generator: torch.Generator) -> Optional[torch.Tensor]:
        """The pass's logits computed the regulariser's own way (JR's forward-mode tangent), or None."""
        return None

    def features(self, feats: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Last hidden features [K,B,D] -> what the members' heads see (with transforms_features)."""
        return feats

    def term(self, out: StepOutputs) -> Optional[torch.Tensor]:
        """[K] per-member penalties or a scalar; None adds nothing (a pure feature transform)."""
        return None

    def state_dict(self) -> Optional[dict]:
        """State carried across steps (tensors and plain containers), for resumable runs."""
        return None

    def load_state_dict(self, sd: Optional[dict], device: torch.device) -> None:
        pass


def active(train_cfg, k: int) -> list[Regulariser]:
    """The regularisers a train config switches on, in registration order (which fixes the order
    of their random draws, so every executor draws the same numbers)."""
    return [cls(getattr(train_cfg, key), k) for key, cls in REGULARISERS.items()
            if cls.enabled(getattr(train_cfg, key, None))]
