"""The base of every config section. Each section is owned by the module that reads it (a
regulariser's by its file, an attack's by its attack); config/schema.py composes them into one
RunConfig. Strict: unknown keys are errors, assignments are validated, no inf or nan."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class Section(BaseModel):
    # No field of a run makes sense at inf or nan (train.lr: .inf trained to NaN and reported accuracies).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def nonneg_eps(eps):
    bad = [e for e in (eps if isinstance(eps, list) else [eps]) if e < 0]
    if bad:
        raise ValueError(f"eps must be >= 0, got {bad[0]}")
    return eps


EpsGrid = Annotated[list[float], Field(min_length=1), AfterValidator(nonneg_eps)]
