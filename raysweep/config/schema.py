"""The run config: one typed schema, validated at load. Sections are owned by the modules that
read them (an attack's by its attack, a regulariser's by its file, data's by core/data.py); this
module composes them into `RunConfig`, with the rules that tie sections together. The train
section gets one field per registered regulariser, eval one per registered evaluation, and
ensemble.method one value per registered method, so a plug-in is configurable, checked and
searchable without an edit here.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, create_model, field_validator, model_validator

import raysweep.evaluation  # noqa: F401  (registers the built-in evaluations)
import raysweep.methods  # noqa: F401  (registers the built-in methods)
import raysweep.regularisers  # noqa: F401  (registers the built-in regularisers)
from raysweep.attacks.adversarial import AdversarialTrainingConfig
from raysweep.core.data import DataConfig
from raysweep.core.ensemble import COMBINES
from raysweep.core.models import ARCHS
from raysweep.core.sections import Section
from raysweep.evaluation.base import EVALUATIONS
from raysweep.methods.base import METHODS, EnsembleMethod
from raysweep.plugins import load_installed_plugins
from raysweep.regularisers.base import REGULARISERS, active


class CompositeConfig(Section):
    robust: str = Field(..., description="checkpoint of the robust ensemble (PGD-trained at eps)")
    natural: str = Field(..., description="checkpoint of the natural ensemble")


class ModelConfig(Section):
    arch: Literal[(*ARCHS, "composite")] = "lenet5"
    width: float = Field(1.0, gt=0, le=8, description="multiplies channels and hidden units (lenet5, small_cnn); "
                         "about sqrt(K) gives one model with K times the parameters (DoubleAdv)")
    composite: Optional[CompositeConfig] = Field(None, description="with arch: composite (meta-composites)")

    @model_validator(mode="after")
    def _composite_section(self):
        if (self.arch == "composite") != (self.composite is not None):
            raise ValueError("arch: composite and the composite: {robust, natural} section go together")
        return self


class EnsembleBase(Section):
    """ensemble: K members and how they combine; `method` (one of methods.METHODS) is added by compose()."""
    k: int = Field(3, ge=1)
    combine: Literal[COMBINES] = Field("probability", description="probability, logit (averages); vote (hard "
                                       "majority), median (per class): how an attack meets them, docs/methods.md")
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


class ProbeConfig(Section):
    """A robustness reading after every epoch, for early stopping (search.asha.metric: probe_acc):
    training accuracy cannot see a robustness collapse. The ensemble's accuracy on the first `samples`
    test images under PGD-linf at `eps` against its averaged probabilities (the Ensemble-Adv attack
    of training, uniform start, sign steps of 2.5 eps / steps). The test split is the one the
    sweep's objectives are measured on: early stopping selects on it, as the objectives do."""
    eps: float = Field(..., gt=0, le=1)
    steps: int = Field(5, ge=1)
    samples: int = Field(256, ge=1)


class TrainBase(Section):
    """train: the optimiser and the base loss; each registered regulariser adds its section (compose())."""
    epochs: int = Field(5, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="an ensemble method may bring its own (snapshot: cyclic cosine, methods/snapshot.py)")
    loss: Literal["member_ce", "ensemble_ce"] = Field(
        "member_ce", description="member_ce: sum_k CE(f_k) (members trained side by side); ensemble_ce: CE of the "
        "averaged probabilities (the ensemble trained as one model)")
    adversarial: Optional[AdversarialTrainingConfig] = None
    probe: Optional[ProbeConfig] = None
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: the training step's passes (forward, the adversarial examples of training, the "
        "regularisers, backward) under torch.autocast(bfloat16); weights, optimiser state and every evaluation "
        "stay fp32 (docs/performance.md)")


class RayExecutorConfig(Section):
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


class ExecutorConfig(Section):
    kind: Literal["local", "ray"] = "local"
    vectorize: Literal["auto", "loop", "vmap"] = Field(
        "auto", description="auto: loop on CPU, vmap on CUDA (measured faster there), loop when members have BatchNorm")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="local executor; Ray workers use "
                                                    "executor.ray.gpus_per_worker")
    channels_last: Literal["auto", True, False] = Field(
        "auto", description="conv members' weights and inputs in channels_last (NHWC) layout: same numbers, other "
        "kernels; looped members only (vmap stacks the members' weights into one 5-D tensor, which has no such "
        "layout). auto: on for looped members without BatchNorm on the CPU, where it measured 1.2-2.6x faster "
        "(docs/performance.md), off elsewhere")
    compile: bool = Field(False, description="torch.compile each member's forward (looped) or the vmapped "
                          "forward; compiled graphs cannot be differentiated twice, so not with train.deg or "
                          "train.jr's double_backward estimator")
    ray: RayExecutorConfig = RayExecutorConfig()

    @model_validator(mode="after")
    def _ray_settings(self):
        r = self.ray
        if self.kind == "ray" and self.device != "auto":
            raise ValueError(f"executor.device = {self.device!r} applies to the local executor; Ray workers get a "
                             f"GPU from executor.ray.gpus_per_worker")
        if self.channels_last is True and self.vectorize == "vmap":
            raise ValueError("executor.channels_last applies to looped members (vmap stacks the members' weights "
                             "into one 5-D tensor, which has no channels_last layout); use vectorize: loop or auto")
        if r.backend == "nccl" and not r.gpus_per_worker >= 1:
            raise ValueError(f"executor.ray.backend: nccl needs a whole GPU per worker (NCCL refuses two ranks on "
                             f"one GPU), got gpus_per_worker = {r.gpus_per_worker}; use gloo or auto")
        return self


class EvalBase(Section):
    """eval: knobs every evaluation shares; each registered evaluation adds its section (compose())."""
    batch_size: int = Field(500, ge=1)
    weighted_acc_w: float = Field(0.5, ge=0, le=1, description="w of the weighted accuracy (eval.uap)")
    attack_members: bool = Field(False, description="also attack each member alone (its own CE) with every attack")

    @model_validator(mode="after")
    def _sections_fit(self):
        for key, cls in EVALUATIONS.items():
            section = getattr(self, key, None)
            if cls.enabled(section):
                cls.check(section, self)
        return self


class RunBase(Section):
    """The run; compose() adds the ensemble and train sections built from the plug-in registries."""
    name: str = "run"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    executor: ExecutorConfig = ExecutorConfig()

    @property
    def method(self) -> type[EnsembleMethod]:
        return METHODS[self.ensemble.method]

    @property
    def trained_members(self) -> int:
        """Networks actually trained: K, or fewer for a method that derives members (snapshots of one network)."""
        return self.method.trained_networks(self.ensemble.k)

    @model_validator(mode="after")
    def _method_combinations(self):
        t, k, method = self.train, self.ensemble.k, self.method
        coupling = [f"train.{key}" for key, cls in REGULARISERS.items() if cls.joint and cls.enabled(getattr(t, key))]
        coupling += [name for name, on in (("train.loss: ensemble_ce", t.loss == "ensemble_ce"),
                                           ("train.adversarial.mode: ensemble",
                                            t.adversarial is not None and t.adversarial.mode == "ensemble")) if on]
        if coupling and not method.joint:
            joint = " or ".join(name for name, m in METHODS.items() if m.joint)
            raise ValueError(f"{', '.join(coupling)} make members interact and need ensemble.method: {joint} "
                             f"(all members see the same mini-batch), got {method.name!r}")
        for key, cls in REGULARISERS.items():
            section = getattr(t, key)
            if not cls.enabled(section):
                continue
            if k < cls.min_k:
                raise ValueError(f"train.{key} is a term between members and needs ensemble.k >= {cls.min_k}, "
                                 f"got k = {k}")
            cls.check(section, k)
        adv = t.adversarial
        if adv is not None and isinstance(adv.eps, list):
            if adv.mode != "member":
                raise ValueError("train.adversarial.eps: a per-member list needs mode: member (Ensemble-Adv attacks "
                                 "the averaged ensemble with one eps)")
            if len(adv.eps) != k:
                raise ValueError(f"train.adversarial.eps has {len(adv.eps)} values but ensemble.k = {k}: give one "
                                 f"eps per member")
        method.check(self)
        twice = [f"train.{r.key}" for r in active(t, k) if r.needs_input_grad]
        if self.executor.compile and twice:
            raise ValueError(f"executor.compile: compiled graphs cannot be differentiated twice, and "
                             f"{', '.join(twice)} differentiate an input gradient (double backward); set compile: "
                             "false, or use train.jr.estimator: forward_mode")
        trained = self.trained_members
        per_worker = self.executor.ray.members_per_worker
        if self.executor.kind == "ray" and trained % per_worker:
            raise ValueError(f"executor.ray.members_per_worker = {per_worker} must divide the {trained} trained "
                             f"network(s) ({'ensemble.k' if trained == k else f'{method.name} trains {trained}'})")
        return self


def _compose() -> tuple[type[Section], type[Section], type[Section], type[RunBase]]:
    """(EnsembleConfig, TrainConfig, EvalConfig, RunConfig) from the static sections and the plug-ins."""
    ensemble = create_model(
        "EnsembleConfig", __base__=EnsembleBase, __module__=__name__,
        method=(Literal[tuple(METHODS)], Field("independent", description="; ".join(
            f"{name}: {m.description}" for name, m in METHODS.items()))))
    train = create_model("TrainConfig", __base__=TrainBase, __module__=__name__,
                         **{key: (Optional[cls.Config], cls.default) for key, cls in REGULARISERS.items()})
    evaluation = create_model("EvalConfig", __base__=EvalBase, __module__=__name__,
                              **{key: (cls.Config, cls.default) for key, cls in EVALUATIONS.items()})
    run = create_model("RunConfig", __base__=RunBase, __module__=__name__,
                       ensemble=(ensemble, ensemble()), train=(train, train()), eval=(evaluation, evaluation()))
    return ensemble, train, evaluation, run


load_installed_plugins()
_composed: dict[tuple, tuple] = {}  # one composition per set of plug-ins: a class, once made, stays the same
EnsembleConfig: type[Section] = EnsembleBase
TrainConfig: type[Section] = TrainBase
EvalConfig: type[Section] = EvalBase
RunConfig: type[RunBase] = RunBase


def run_config_model() -> type[RunBase]:
    """The current RunConfig class, composed again when the registered plug-ins have changed since
    the last call. Validate through this (or io.validate_config): a class imported earlier misses
    later plug-ins. The composed classes are this module's globals, so configs pickle by reference
    (Ray, Tune); the same plug-ins always give the same classes."""
    global EnsembleConfig, TrainConfig, EvalConfig, RunConfig
    key = (tuple(REGULARISERS.items()), tuple(METHODS.items()), tuple(EVALUATIONS.items()))
    if key not in _composed:
        _composed[key] = _compose()
    EnsembleConfig, TrainConfig, EvalConfig, RunConfig = _composed[key]
    return RunConfig


run_config_model()
