"""One typed config schema for every run, validated at load.

A YAML file maps onto `RunConfig`; unknown keys, wrong types and out-of-range values are
errors that name the field path and what is allowed. `--set a.b=value` overrides are applied
to the raw YAML before validation, so they are checked the same way.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raysweep.errors import ConfigError

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "synthetic")
ARCHS = ("lenet5", "small_cnn", "resnet18", "composite")
ATTACK_OBJECTIVES = ("ce_prob", "ce_logit", "cw_margin", "mean_member_ce")


def _nonneg_eps(eps):
    bad = [e for e in (eps if isinstance(eps, list) else [eps]) if e < 0]
    if bad:
        raise ValueError(f"eps must be >= 0, got {bad[0]}")
    return eps


EpsGrid = Annotated[list[float], Field(min_length=1), AfterValidator(_nonneg_eps)]


class _Strict(BaseModel):
    # No field of a run makes sense at inf or nan (train.lr: .inf trained to NaN and reported accuracies).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SyntheticConfig(_Strict):
    num_classes: int = Field(10, ge=2)
    image_shape: tuple[int, int, int] = (1, 28, 28)
    noise: float = Field(0.15, ge=0)


class DataConfig(_Strict):
    dataset: Literal[DATASETS] = "fashion_mnist"
    data_dir: Optional[str] = None
    download: bool = True
    train_size: Optional[int] = Field(None, ge=1, description="first N after a seeded shuffle; null = all")
    test_size: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(128, ge=1)
    synthetic: SyntheticConfig = SyntheticConfig()


class CompositeConfig(_Strict):
    robust: str = Field(..., description="checkpoint of the robust ensemble (PGD-trained at eps)")
    natural: str = Field(..., description="checkpoint of the natural ensemble")


class ModelConfig(_Strict):
    arch: Literal[ARCHS] = "lenet5"
    width: float = Field(1.0, gt=0, le=8, description="multiplies channels and hidden units (lenet5, small_cnn); "
                         "about sqrt(K) gives one model with K times the parameters (DoubleAdv)")
    composite: Optional[CompositeConfig] = Field(None, description="with arch: composite (meta-composites)")

    @model_validator(mode="after")
    def _composite_section(self):
        if (self.arch == "composite") != (self.composite is not None):
            raise ValueError("arch: composite and the composite: {robust, natural} section go together")
        return self


class EnsembleConfig(_Strict):
    k: int = Field(3, ge=1)
    method: Literal["independent", "bagging", "snapshot", "joint"] = Field(
        "independent", description="independent: own shuffles; bagging: own bootstrap samples; snapshot: one "
        "run, cyclic LR; joint: all members see the same mini-batch (simultaneous training)")
    combine: Literal["probability", "logit"] = "probability"
    weights: Optional[list[float]] = Field(None, description="convex weights, one per member; null = uniform")

    @field_validator("weights")
    @classmethod
    def _convex(cls, w):
        if w is None:
            return w
        if any(c <= 0 for c in w):
            raise ValueError(f"every weight must be > 0, got {w}")
        if abs(sum(w) - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1, got sum {sum(w):.6g}")
        return w

    @model_validator(mode="after")
    def _weights_match_k(self):
        if self.weights is not None and len(self.weights) != self.k:
            raise ValueError(f"weights has {len(self.weights)} values but k = {self.k}: give one weight per member")
        return self


class JacobianRegConfig(_Strict):
    lambda_jr: float = Field(0.0, ge=0, le=2, description="SPEC section 1: L = CE + lambda_jr/2 * mean ||J||_F^2")
    n_proj: int = Field(1, ge=1)
    exact: bool = Field(False, description="exact ||J||_F^2 with C backward passes (tests, tiny models)")
    estimator: Literal["double_backward", "forward_mode"] = Field(
        "double_backward", description="double_backward: random output projections, one backward with "
        "create_graph (the reference); forward_mode: J u for one random unit input direction u per sample, carried "
        "through the forward pass as a forward-mode tangent, no double backward (docs/estimators.md)")

    @model_validator(mode="after")
    def _estimator_fits(self):
        if self.estimator == "forward_mode" and (self.exact or self.n_proj != 1):
            raise ValueError(f"train.jr.estimator 'forward_mode' draws one direction per sample and is not exact; "
                             f"it cannot be combined with exact: {self.exact} or n_proj: {self.n_proj} (use "
                             "estimator 'double_backward')")
        return self


class AdversarialTrainingConfig(_Strict):
    """member: each member trained on PGD examples against itself alone (Madry; SeparateAdv), with
    one eps or a per-member list; ensemble: Ensemble-Adv, examples against the averaged ensemble."""
    mode: Literal["member", "ensemble"]
    eps: Annotated[float | list[float], AfterValidator(_nonneg_eps)]
    norm: Literal["linf", "l2"] = "linf"
    steps: int = Field(7, ge=1)
    step_size: Optional[float] = Field(None, gt=0, description="null: 2.5 * eps / steps")
    step_rule: Literal["sign", "adam"] = Field("sign", description="sign = IFGSM/PGD sign steps; adam = Adam steps")
    start: Optional[Literal["none", "uniform", "gaussian"]] = Field(
        None, description="null: gaussian for mode ensemble (SPEC section 3), uniform for member")
    sigma: Optional[float] = Field(None, ge=0, description="std of the gaussian start; null: eps / 2")
    clean: Optional[bool] = Field(None, description="add the clean loss; null: true for ensemble, false for member")
    rho: float = Field(1.0, ge=0, description="weight of the adversarial loss")


class DEGConfig(_Strict):
    lambda_deg: float = Field(0.01, ge=0, description="L = L_ECE + lambda * sum_{i<j} cos(g_i, g_j)")


class PDDConfig(_Strict):
    alpha: float = Field(0.9, gt=0, le=1)
    beta: float = Field(0.1, ge=0, le=1)
    m: int = Field(10, ge=2, description="number of intervals; must exceed ensemble.k")
    period: int = Field(1, ge=1, description="steps per statistics period; 1 = the current mini-batch")
    rescale: bool = Field(False, description="divide kept units by their keep rate (inverted dropout)")


class ADPConfig(_Strict):
    alpha: float = Field(2.0, ge=0)
    beta: float = Field(0.5, ge=0)
    det_offset: float = Field(1e-6, gt=0, description="multiple of the identity added before the log-det")


class ProbeConfig(_Strict):
    """A robustness reading after every epoch, for early stopping (search.asha.metric: probe_acc):
    training accuracy cannot see a robustness collapse. The ensemble's accuracy on the first `samples`
    test images under PGD-linf at `eps` against its averaged probabilities (the Ensemble-Adv attack
    of training, uniform start, sign steps of 2.5 eps / steps). The test split is the one the
    sweep's objectives are measured on: early stopping selects on it, as the objectives do."""
    eps: float = Field(..., gt=0, le=1)
    steps: int = Field(5, ge=1)
    samples: int = Field(256, ge=1)


class TrainConfig(_Strict):
    epochs: int = Field(5, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="snapshot ensembles always use the cyclic cosine schedule of SPEC section 1")
    jr: JacobianRegConfig = JacobianRegConfig()
    loss: Literal["member_ce", "ensemble_ce"] = Field(
        "member_ce", description="member_ce: sum_k CE(f_k) (members trained side by side); ensemble_ce: CE of the "
        "averaged probabilities (the ensemble trained as one model)")
    adversarial: Optional[AdversarialTrainingConfig] = None
    deg: Optional[DEGConfig] = None
    pdd: Optional[PDDConfig] = None
    adp: Optional[ADPConfig] = None
    probe: Optional[ProbeConfig] = None


class RayExecutorConfig(_Strict):
    """executor.kind: ray: a Ray Train TorchTrainer, one worker per `members_per_worker` members."""
    members_per_worker: int = Field(1, ge=1, description="members in each worker (vectorised per executor.vectorize)")
    cpus_per_worker: float = Field(1.0, gt=0, description="fractions share cores")
    gpus_per_worker: float = Field(0.0, ge=0, description="0: CPU; a fraction shares one GPU between workers")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="auto: nccl with whole GPUs per worker, else gloo (NCCL refuses two ranks on one GPU)")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint (FailureConfig)")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints; the last epoch always is one")
    storage: Optional[str] = Field(None, description="checkpoint storage: a local path or a pyarrow filesystem URI "
                                   "(s3://, gs://, ...); default <run output>/ray")
    wait_for_resources: bool = Field(False, description="false: fail at once when the cluster lacks the CPUs/GPUs "
                                     "asked for; true: wait (autoscaling clusters add nodes)")


class ExecutorConfig(_Strict):
    kind: Literal["local", "ray"] = "local"
    vectorize: Literal["auto", "loop", "vmap"] = Field(
        "auto", description="auto: loop on CPU, vmap on CUDA (measured faster there), loop when members have BatchNorm")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="local executor; Ray workers use "
                                                    "executor.ray.gpus_per_worker")
    ray: RayExecutorConfig = RayExecutorConfig()

    @model_validator(mode="after")
    def _ray_settings(self):
        r = self.ray
        if self.kind == "ray" and self.device != "auto":
            raise ValueError(f"executor.device = {self.device!r} applies to the local executor; Ray workers get a "
                             f"GPU from executor.ray.gpus_per_worker")
        if r.backend == "nccl" and not r.gpus_per_worker >= 1:
            raise ValueError(f"executor.ray.backend: nccl needs a whole GPU per worker (NCCL refuses two ranks on "
                             f"one GPU), got gpus_per_worker = {r.gpus_per_worker}; use gloo or auto")
        return self


class AttackConfig(_Strict):
    name: str
    kind: Literal["fgsm", "bim", "pgd"] = "pgd"
    norm: Literal["linf", "l2"] = "linf"
    eps: EpsGrid
    steps: int = Field(10, ge=1)
    step_size: Optional[float] = Field(None, gt=0, description="null: 2.5*eps/steps for pgd, eps/steps for bim")
    restarts: int = Field(1, ge=1)
    random_start: Optional[bool] = Field(None, description="null: true for pgd, false for fgsm/bim")
    step_rule: Literal["sign", "adam"] = "sign"
    objectives: list[Literal[ATTACK_OBJECTIVES]] = Field(["ce_prob"], min_length=1)
    double_steps: bool = Field(False, description="double the steps until robust accuracy stops falling "
                               "(Grefenstette et al.'s rule against false robustness); reports convergence")
    max_steps: int = Field(640, ge=1, description="cap for double_steps")


class UAPConfig(_Strict):
    eps: EpsGrid = [0.10, 0.15, 0.20, 0.25]
    seeds: int = Field(50, ge=1)
    iterations: int = Field(100, ge=1)
    batch_size: int = Field(200, ge=1)
    step_size: Optional[float] = Field(None, gt=0, description="null: eps/20")
    step_rule: Literal["sign", "adam"] = "sign"
    objective: Literal[ATTACK_OBJECTIVES] = "ce_prob"
    craft_on: Literal["train", "test"] = Field("train", description="which split's batches craft the UAP")
    selection_size: int = Field(1000, ge=1, description="crafting images used to pick the worst-case seed")


class AutoAttackConfig(_Strict):
    """AutoAttack-grade evaluation through ART: a sample is robust only if it survives every attack."""
    eps: EpsGrid
    norm: Literal["linf", "l2"] = "linf"
    attacks: list[Literal["apgd-ce", "apgd-dlr", "square"]] = Field(["apgd-ce", "apgd-dlr", "square"], min_length=1)
    max_iter: int = Field(100, ge=1, description="APGD iterations")
    square_queries: int = Field(5000, ge=1)
    samples: Optional[int] = Field(None, ge=1, description="first N test images; null = all")


class CWL2Config(_Strict):
    """Carlini & Wagner L2 (attacks/cw.py); SPEC section 4: learning rate 0.001, 1000 steps."""
    learning_rate: float = Field(0.001, gt=0)
    max_iter: int = Field(1000, ge=1)
    binary_search_steps: int = Field(5, ge=1)
    initial_const: float = Field(0.01, gt=0)
    confidence: float = Field(0.0, ge=0)
    samples: int = Field(200, ge=1)


class JSMAConfig(_Strict):
    """JSMA (L0) through ART: theta is the change per feature, gamma the largest fraction changed."""
    theta: float = Field(1.0, gt=0)
    gamma: float = Field(0.1, gt=0, le=1)
    samples: int = Field(200, ge=1)


class TransferConfig(_Strict):
    """Black-box transfer: raysweep trains a surrogate ensemble from this run's own config with
    another architecture, crafts adversarial examples on it, and measures the target on them.
    type I (oblivious): the surrogate drops every defence (JR, adversarial training, PDD, DEG,
    ADP; plain member CE); type II (adaptive): the surrogate keeps the same defence."""
    name: str
    type: Literal["I", "II"]
    arch: Literal["lenet5", "small_cnn", "resnet18"] = Field(..., description="the surrogate's architecture")
    attack: AttackConfig = Field(..., description="crafting attack on the surrogate (first objective used)")
    epochs: Optional[int] = Field(None, ge=1, description="surrogate training epochs; null = the run's")
    samples: Optional[int] = Field(None, ge=1, description="first N test images; null = all")


class AUCConfig(_Strict):
    attack: str
    eps_target: float = Field(..., gt=0)


class EvalConfig(_Strict):
    batch_size: int = Field(500, ge=1)
    attacks: list[AttackConfig] = []
    uap: Optional[UAPConfig] = UAPConfig()
    weighted_acc_w: float = Field(0.5, ge=0, le=1)
    auc: Optional[AUCConfig] = None
    jacobian_samples: int = Field(200, ge=0, description="test images for the exact mean ||J||_F^2; 0 = skip")
    transfer: list[TransferConfig] = []
    autoattack: Optional[AutoAttackConfig] = None
    cw_l2: Optional[CWL2Config] = None
    jsma: Optional[JSMAConfig] = None
    attack_members: bool = Field(False, description="also attack each member alone (its own CE) with every attack")
    diversity_samples: int = Field(500, ge=0, description="test images for the diversity metrics; 0 = skip")

    @model_validator(mode="after")
    def _auc_attack_known(self):
        names = [a.name for a in self.attacks]
        if len(set(names)) != len(names):
            raise ValueError(f"attack names must be unique, got {names}")
        if self.auc is not None:
            if self.auc.attack not in names:
                raise ValueError(f"auc.attack '{self.auc.attack}' is not one of the attacks {names}")
            attack = self.attacks[names.index(self.auc.attack)]
            if self.auc.eps_target not in attack.eps:
                raise ValueError(
                    f"auc.eps_target {self.auc.eps_target} must be in attack '{attack.name}' eps grid {attack.eps}")
        return self


class RunConfig(_Strict):
    name: str = "run"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    train: TrainConfig = TrainConfig()
    executor: ExecutorConfig = ExecutorConfig()
    eval: EvalConfig = EvalConfig()

    @property
    def trained_members(self) -> int:
        """Networks actually trained: K, or 1 for snapshot ensembles (K snapshots of one network)."""
        return 1 if self.ensemble.method == "snapshot" else self.ensemble.k

    @model_validator(mode="after")
    def _method_combinations(self):
        t, k, method = self.train, self.ensemble.k, self.ensemble.method
        joint_only = [name for name, on in (("train.deg", t.deg), ("train.pdd", t.pdd), ("train.adp", t.adp),
                                            ("train.loss: ensemble_ce", t.loss == "ensemble_ce"),
                                            ("train.adversarial.mode: ensemble",
                                             t.adversarial is not None and t.adversarial.mode == "ensemble")) if on]
        if joint_only and method != "joint":
            raise ValueError(f"{', '.join(joint_only)} make members interact and need ensemble.method: joint "
                             f"(all members see the same mini-batch), got {method!r}")
        for name, on in (("train.deg", t.deg), ("train.pdd", t.pdd), ("train.adp", t.adp)):
            if on and k < 2:
                raise ValueError(f"{name} is a diversity term between members and needs ensemble.k >= 2, got k = {k}")
        if t.pdd is not None and t.pdd.m <= k:
            raise ValueError(f"train.pdd.m must be > ensemble.k (each member needs its own priority interval), "
                             f"got m = {t.pdd.m}, k = {k}")
        adv = t.adversarial
        if adv is not None and isinstance(adv.eps, list):
            if adv.mode != "member":
                raise ValueError("train.adversarial.eps: a per-member list needs mode: member (Ensemble-Adv attacks "
                                 "the averaged ensemble with one eps)")
            if len(adv.eps) != k:
                raise ValueError(f"train.adversarial.eps has {len(adv.eps)} values but ensemble.k = {k}: give one "
                                 f"eps per member")
        if method == "snapshot" and (adv is not None and adv.mode == "ensemble"):
            raise ValueError("snapshot ensembles train one network: train.adversarial.mode must be member")
        trained = self.trained_members
        per_worker = self.executor.ray.members_per_worker
        if self.executor.kind == "ray" and trained % per_worker:
            raise ValueError(f"executor.ray.members_per_worker = {per_worker} must divide the {trained} trained "
                             f"member(s) ({'snapshot trains one network' if method == 'snapshot' else 'ensemble.k'})")
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:" if source else "invalid config:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "literal_error":
            msg = f"got {e['input']!r}; {msg.lower()}"
        elif "input" in e and e["type"] not in ("value_error", "missing"):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (e.g. train.epochs=3), got {text!r}")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set key {key!r} is not a dotted field path")
    try:
        return key.split("."), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({problem})") from None


def set_path(raw: dict, path: list[str], value, what: str = "") -> dict:
    """Set a dotted path in a raw config, creating sections; a number indexes a list."""
    what = what or ".".join(path)
    node = raw
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{what}: {part!r} is not an index of a list of {len(node)}")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"{what}: {'.'.join(path[:i])!r} is not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set` overrides: dotted paths; a number indexes a list (eval.attacks.0.steps=20)."""
    for text in overrides:
        path, value = parse_override(text)
        set_path(raw, path, value, f"--set {text!r}")
    return raw


def absolute_paths(raw: dict, root: Path) -> dict:
    """A raw config with its file paths made absolute against `root`: Ray workers and Tune trials do
    not run in the launching directory."""
    raw = copy.deepcopy(raw)
    data, comp = raw.get("data") or {}, (raw.get("model") or {}).get("composite") or {}
    if data.get("data_dir"):
        data["data_dir"] = str((root / Path(data["data_dir"]).expanduser()).resolve())
    for key in ("robust", "natural"):
        if comp.get(key):
            comp[key] = str((root / comp[key]).resolve())
    return raw


def validate_config(raw: dict, source: str = "") -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def read_yaml(path: str | Path, what: str = "config") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    raw = read_yaml(path) if path is not None else {}
    return validate_config(apply_overrides(raw, list(overrides)), str(path or "(defaults)"))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
