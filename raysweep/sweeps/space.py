"""Search spaces: a run config plus a `search:` section, validated before any trial starts.

    search:
      objective: weighted_acc          # or auc, clean_acc, mean_uap_acc,
                                       # {metric: robust_acc, attack: pgd_linf, eps: 0.1},
                                       # or a list of them: a Pareto front (NSGA-II)
      samples: 8
      seed: 0
      params:                          # dotted paths into the run config
        train.jr.lambda_jr: {loguniform: [0.001, 1.0]}
        ensemble.k: {int: [2, 6]}
        ensemble.method: {choice: [bagging, independent]}
        train.adversarial.eps: {per_member: {uniform: [0.02, 0.08]}}   # K values, K as sampled

Points the run schema rejects (e.g. PDD's M <= K) are not errors of the sweep: the trial reports
itself infeasible (objective 0, every objective is an accuracy to maximise) and the search moves on.
"""
from __future__ import annotations

import copy
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, ValidationError, field_validator

from raysweep.config import (
    RunConfig,
    absolute_paths,
    apply_overrides,
    format_validation_error,
    read_yaml,
    run_config_model,
    set_path,
    validate_config,
)
from raysweep.core.sections import Section
from raysweep.errors import ConfigError
from raysweep.sweeps.champion import ChampionConfig
from raysweep.sweeps.objectives import Objective, check_objective, objective_from_name
from raysweep.training.pack import packs

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice", "per_member")
class AshaConfig(Section):
    """Early stopping on a per-epoch reading (the objectives exist only after evaluation): the training
    accuracy, or the robustness probe of train.probe."""
    metric: Literal["train_acc", "probe_acc"] = "train_acc"
    grace_period: int = Field(1, ge=1, description="epochs every trial runs")
    reduction_factor: float = Field(2.0, gt=1)


class SearchConfig(Section):
    objective: list[Objective]
    samples: int = Field(8, ge=1)
    seed: int = 0
    params: dict[str, Any] = Field(..., min_length=1)
    max_concurrent: Optional[int] = Field(None, ge=1, description="default: as many as the cluster's CPUs/GPUs hold")
    trial_cpus: float = Field(1.0, gt=0, description="CPUs a trial reserves (its training threads, or its Ray "
                              "executor's driver and evaluation)")
    trial_gpus: float = Field(0.0, ge=0)
    max_failures: int = Field(2, ge=0, description="retries of a trial whose process or node died (Tune "
                              "FailureConfig); an error raised by the trial's own code is recorded, not retried")
    asha: Optional[AshaConfig] = None
    pack: int = Field(1, ge=1, description="trials per Tune trial, in one process: Tune's trial start-up and the "
                      "data loading are paid once per pack; each trial is still its own Optuna trial, MLflow run "
                      "and record")
    pack_training: Literal["together", "in_turn"] = Field(
        "together", description="together: a pack's trials that differ only in train.lr, train.jr.lambda_jr "
        "and member-mode train.adversarial.eps train as one ensemble of N x K members, each exactly as alone "
        "(one forward and backward for all: what fills a GPU); the others, and all under in_turn, train one "
        "after another")
    color_by: Optional[str] = Field(None, description="parameter colouring the trade-off plot; default the first")
    champion: ChampionConfig = Field(ChampionConfig(), description="--register: candidates re-evaluated under a "
                                     "strong protocol before one is registered")

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_list(cls, v):
        items = v if isinstance(v, list) else [v]
        return [objective_from_name(i) if isinstance(i, str) else i for i in items]

    @property
    def multi(self) -> bool:
        return len(self.objective) > 1


@dataclass
class Param:
    path: str
    kind: str
    args: Any  # (low, high) or a list of choices or the per-member inner Param

    def suggest(self, trial, name: str):
        if self.kind == "uniform":
            return trial.suggest_float(name, *self.args)
        if self.kind == "loguniform":
            return trial.suggest_float(name, *self.args, log=True)
        if self.kind == "int":
            return trial.suggest_int(name, *self.args)
        return trial.suggest_categorical(name, self.args)


@dataclass
class SearchSpace:
    search: SearchConfig
    base: dict  # the run config without `search:`, paths absolute
    base_cfg: RunConfig
    params: list[Param]
    source: str

    @property
    def name(self) -> str:
        return self.base_cfg.name

    def define_by_run(self, trial) -> None:
        """Optuna define-by-run: K first, so per-member lists get K values."""
        k = self.base_cfg.ensemble.k
        for p in self.params:
            if p.kind == "per_member":
                for i in range(k):
                    p.args.suggest(trial, f"{p.path}.{i}")
            else:
                value = p.suggest(trial, p.path)
                if p.path == "ensemble.k":
                    k = value

    def sampler(self, offset: int = 0):
        """Optuna's sampler for this search, seeded with search.seed + offset (a resumed sweep passes the
        number of trials already done, so it does not redraw the same points): NSGA-II for a Pareto
        front, else TPE."""
        from optuna.samplers import NSGAIISampler, TPESampler

        seed = self.search.seed + offset
        return NSGAIISampler(seed=seed) if self.search.multi else TPESampler(seed=seed)

    def preview(self, n: int) -> list[dict]:
        """`--dry-run`: the first `n` points the seeded sampler draws while no result has come back (the
        sweep's first points, up to its concurrency; later ones depend on results), each validated as its
        trial would be: `infeasible` is why the run schema rejects it, else None."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=self.sampler(), directions=["maximize"] * len(self.search.objective))
        points = []
        for _ in range(n):
            trial = study.ask()
            self.define_by_run(trial)
            try:
                validate_config(self.trial_config(trial.params), "")
                why = None
            except ConfigError as err:
                why = str(err)
            points.append({"params": dict(trial.params), "infeasible": why})
        return points

    def pack_groups(self, points: list[dict]) -> list[list[int]]:
        """A Tune trial's points (sampled values) grouped into those trained together (training.pack.packs),
        each group in the order sampled; each point in its own group under search.pack_training: in_turn
        (and wherever training.pack cannot step them as one: another K, method, ..., the Ray executor)."""
        if self.search.pack_training == "in_turn" or len(points) == 1:
            return [[j] for j in range(len(points))]
        cfgs = []
        for values in points:
            try:
                cfgs.append(validate_config(self.trial_config(values)))
            except ConfigError:
                cfgs.append(None)  # infeasible: reported alone
        return packs(cfgs)

    def trial_config(self, values: dict) -> dict:
        """The raw run config of one trial (validated by the caller: may be infeasible)."""
        raw = copy.deepcopy(self.base)
        lists: dict[str, dict[int, Any]] = {}
        for name, value in values.items():
            head, _, last = name.rpartition(".")
            if any(p.path == head and p.kind == "per_member" for p in self.params):
                lists.setdefault(head, {})[int(last)] = value
            else:
                set_path(raw, name.split("."), value)
        for path, items in lists.items():
            set_path(raw, path.split("."), [items[i] for i in sorted(items)])
        return raw


def describe(values: dict) -> str:
    """Sampled values in a line: the last part of each path, floats to 3 significant digits
    (`lambda_jr=0.0017 k=3 method=bagging`); per-member lists as `eps=[0.03,0.05]`."""
    lists: dict[str, dict[int, Any]] = {}
    flat: dict[str, Any] = {}
    for name, value in values.items():
        head, _, last = name.rpartition(".")
        if last.isdigit():
            lists.setdefault(head, {})[int(last)] = value
        else:
            flat[name] = value
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    parts = [f"{n.rpartition('.')[2]}={fmt(v)}" for n, v in flat.items()]
    parts += [f"{n.rpartition('.')[2]}=[{','.join(fmt(items[i]) for i in sorted(items))}]"
              for n, items in lists.items()]
    return " ".join(parts)


def _parse_param(path: str, spec, where: str) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one distribution such as {{uniform: [low, high]}}, got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; allowed: {', '.join(DISTRIBUTIONS)}")
    if kind == "per_member":
        inner = _parse_param(path, args, f"{where}.per_member")
        if inner.kind == "per_member":
            raise ConfigError(f"{where}: per_member cannot nest")
        return Param(path, kind, inner)
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: choice needs a non-empty list, got {args!r}")
        return Param(path, kind, list(args))
    if not isinstance(args, list) or len(args) != 2 or not all(isinstance(a, (int, float)) for a in args):
        raise ConfigError(f"{where}: {kind} needs [low, high], got {args!r}")
    low, high = args
    if low > high:
        raise ConfigError(f"{where}: low {low} > high {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
    if kind == "int" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: int needs integer bounds, got {args!r}")
    return Param(path, kind, (low, high))


def _model_of(annotation):
    """The pydantic model inside an annotation such as Optional[X] or list[X], else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def check_path(path: str, where: str):
    """Every segment of a dotted path must be a field of the run schema; returns the last field's
    FieldInfo (None when the path ends in a list index)."""
    model: type[BaseModel] | None = run_config_model()
    parts = path.split(".")
    field = None
    for i, part in enumerate(parts):
        if model is None:
            raise ConfigError(f"{where}: {'.'.join(parts[:i])!r} is a value, not a section")
        if part.isdigit():
            field = None
            continue  # a list index: the list's item model stays current
        field = model.model_fields.get(part)
        if field is None:
            raise ConfigError(f"{where}: unknown parameter path {path!r} ({part!r} is not a field of "
                              f"{'.'.join(parts[:i]) or 'the run config'}; fields: {', '.join(model.model_fields)})")
        model = _model_of(field.annotation)
    return field


# pydantic keeps Field(ge=..., ...) as annotated_types constraints named Ge, Gt, Le, Lt in field.metadata.
_BOUNDS = {"Ge": (">=", lambda v, b: v >= b), "Gt": (">", lambda v, b: v > b),
           "Le": ("<=", lambda v, b: v <= b), "Lt": ("<", lambda v, b: v < b)}


def _check_bounds(p: Param, field, where: str) -> None:
    """A distribution must stay inside the field's schema bounds (ge/gt/le/lt) and, for a fixed set of
    values (Literal), choose among them: else every trial it draws out there fails, one by one."""
    if field is None:
        return
    if p.kind == "per_member":
        return _check_bounds(p.args, None, where)  # list items: checked by their validator, per trial
    values = p.args if p.kind == "choice" else list(p.args)
    literal = [a for a in typing.get_args(field.annotation) if typing.get_origin(a) is Literal] or \
        ([field.annotation] if typing.get_origin(field.annotation) is Literal else [])
    if literal and p.kind == "choice":
        allowed = [v for lit in literal for v in typing.get_args(lit)]
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ConfigError(f"{where}: {bad[0]!r} is not allowed for {p.path}; allowed: "
                              f"{', '.join(map(str, allowed))}")
    for bound in field.metadata:
        name = type(bound).__name__
        if name not in _BOUNDS:
            continue
        op, ok = _BOUNDS[name]
        limit = getattr(bound, name.lower())
        for v in values:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not ok(v, limit):
                raise ConfigError(f"{where}: {p.kind} {list(p.args)} reaches {v}, but {p.path} must be {op} {limit}")


def load_search_space(path: str | Path, overrides: list[str] = (), root: str | Path | None = None) -> SearchSpace:
    """`root`: where the config's relative paths resolve (default the working directory; a resumed
    sweep passes the directory it was started in)."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path, "search space"), list(overrides))
    search_raw = raw.pop("search", None)
    if not isinstance(search_raw, dict):
        raise ConfigError(f"{path}: no `search:` section (a search space is a run config plus `search:`)")
    try:
        search = SearchConfig.model_validate(search_raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"{path} (search section)").replace("  ", "  search.")) \
            from None
    base_cfg = validate_config(raw, f"{path} (the run config around `search:`)")
    params = []
    for name, spec in search.params.items():
        where = f"search.params.{name}"
        field = check_path(name, where)
        params.append(_parse_param(name, spec, where))
        _check_bounds(params[-1], field, where)
    params.sort(key=lambda p: p.path != "ensemble.k")  # K first: per-member lists depend on it
    for o in search.objective:
        check_objective(o, base_cfg)
    if search.asha is not None and search.multi:
        raise ConfigError("search.asha stops trials on one metric; a Pareto search (several objectives) compares "
                          "finished trials only: drop search.asha or keep one objective")
    if search.asha is not None and search.pack > 1:
        raise ConfigError(f"search.pack {search.pack} with search.asha: ASHA stops a Tune trial on its epoch "
                          "reports, and a pack's Tune trial trains several trials one after another; drop "
                          "search.asha or use search.pack: 1")
    if search.asha is not None and search.asha.metric == "probe_acc" and base_cfg.train.probe is None:
        raise ConfigError("search.asha.metric probe_acc needs train.probe (e.g. train: {probe: {eps: 0.1}}) in the "
                          "run config")
    if search.color_by is not None and search.color_by not in search.params:
        raise ConfigError(f"search.color_by {search.color_by!r} is not one of search.params {sorted(search.params)}")
    return SearchSpace(search, absolute_paths(raw, Path(root or Path.cwd())), base_cfg, params, str(path))
