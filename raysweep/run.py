"""One run end to end: train, checkpoint, evaluate, write metrics.json, config and pictures. The
CLI, sweep trials and reproduction studies call these. `evaluate` is the evaluation protocol: clean
accuracy, then every registered evaluation whose eval section is on (evaluation/, in registration
order), then the per-image worst case over the attacks at each eps."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from raysweep import plots
from raysweep.config import RunConfig, checkpoint_config, dump_config, validate_config
from raysweep.core.checkpoint import load, save_checkpoint
from raysweep.core.data import Dataset, load_dataset
from raysweep.core.ensemble import Ensemble
from raysweep.errors import UserError
from raysweep.evaluation import EVALUATIONS, EvalContext, EvalReport
from raysweep.evaluation.robust import accuracies
from raysweep.members import make_local_executor
from raysweep.training.trainer import fit


def evaluate(ensemble: Ensemble, data: Dataset, cfg: RunConfig, progress: bool = True) -> EvalReport:
    """The EvalReport of the ensemble under cfg.eval (its metrics.json is report.to_json())."""
    start = time.perf_counter()
    ex = make_local_executor(list(ensemble.members), cfg.executor.vectorize, cfg.executor.device)
    ex.train(False)
    ctx = EvalContext(cfg, ensemble, data, ex, progress=progress,
                      train=lambda raw: fit(validate_config(raw, "of a transfer surrogate"), data, progress).ensemble)
    report = EvalReport()
    clean, members = accuracies(ctx.stacked_fn, data.test, ctx.weights, ctx.how, cfg.eval.batch_size, ctx.device)
    report.add("clean_acc", clean, images=len(data.test))
    report.details.update(clean_acc=clean, member_clean_acc=members)
    for key, evaluation in EVALUATIONS.items():
        section = getattr(cfg.eval, key)
        if evaluation.enabled(section):
            evaluation(section).run(ctx, report)
    report.add_worst_case()
    report.details["eval_seconds"] = time.perf_counter() - start
    return report


def _write_results(out: Path, cfg: RunConfig, metrics: dict, artifacts: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plots.robustness_curves(metrics, out / "acc_vs_eps.png")
    if artifacts.get("uap_deltas"):
        plots.uap_images(artifacts["uap_deltas"], out / "uap.png")
        save_file({f"eps_{e}": d.contiguous() for e, d in artifacts["uap_deltas"].items()}, str(out / "uap.safetensors"))


def ensure_writable(out: Path, flag: str = "--out") -> None:
    """Fail before training, not when its result is saved."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".raysweep-write-check"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{flag} {out}: cannot write there ({err.strerror or err})") from None


def train_and_evaluate(cfg: RunConfig, out: str | Path, progress: bool = True, callbacks=(),
                       ray_storage: str | None = None, epoch_metrics=None) -> dict:
    """`callbacks` (train.fit hooks) run in this process, so with the local executor only. A Ray run
    inside a Tune trial relays `epoch_metrics(row)` of each epoch to Tune instead (see fit_on_ray).
    `ray_storage`: where a Ray executor run keeps its checkpoints when executor.ray.storage is unset
    (a path or URI every node reaches; default `out/ray`)."""
    out = Path(out)
    ensure_writable(out)
    t0 = time.perf_counter()
    data = load_dataset(cfg.data, cfg.seed)
    if cfg.executor.kind == "ray":
        from raysweep.training.ray import fit_on_ray

        result = fit_on_ray(cfg, data, ray_storage or out / "ray", progress=progress, epoch_metrics=epoch_metrics)
    else:
        result = fit(cfg, data, progress=progress, callbacks=callbacks)
    save_checkpoint(out / "checkpoint", result.ensemble, cfg, data.image_shape, data.num_classes, data.mean, data.std)
    try:
        report = evaluate(result.ensemble, data, cfg, progress=progress)
    except Exception:
        print(f"raysweep: evaluation failed; the trained ensemble is saved: re-evaluate it with "
              f"`raysweep evaluate {out / 'checkpoint'}`", file=sys.stderr)
        raise
    metrics, artifacts = report.to_json(), report.artifacts
    metrics["train"] = {"seconds": result.seconds, "steps": result.state.step, "history": result.state.history,
                        "executor": cfg.executor.kind, **({"ray": result.info} if result.info else {})}
    metrics["total_seconds"] = time.perf_counter() - t0
    _write_results(out, cfg, metrics, artifacts)
    return metrics


def evaluate_checkpoint(path: str | Path, cfg: RunConfig | None, out: str | Path, progress: bool = True) -> dict:
    cfg = cfg or checkpoint_config(path)
    ensure_writable(Path(out))
    ensemble = load(path)
    report = evaluate(ensemble, load_dataset(cfg.data, cfg.seed), cfg, progress=progress)
    metrics = report.to_json()
    _write_results(Path(out), cfg, metrics, report.artifacts)
    return metrics
