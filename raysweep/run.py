"""One run end to end: train, checkpoint, evaluate, write metrics.json, config and pictures.
The CLI calls these; sweeps will call them per trial."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from raysweep import plots
from raysweep.config import RunConfig, checkpoint_config, dump_config
from raysweep.core.checkpoint import load, save_checkpoint
from raysweep.core.data import load_dataset
from raysweep.errors import UserError
from raysweep.evaluation.evaluate import evaluate
from raysweep.training.trainer import fit


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
        metrics, artifacts = evaluate(result.ensemble, data, cfg, progress=progress)
    except Exception:
        print(f"raysweep: evaluation failed; the trained ensemble is saved: re-evaluate it with "
              f"`raysweep evaluate {out / 'checkpoint'}`", file=sys.stderr)
        raise
    metrics["train"] = {"seconds": result.seconds, "steps": result.state.step, "history": result.state.history,
                        "executor": cfg.executor.kind, **({"ray": result.info} if result.info else {})}
    metrics["total_seconds"] = time.perf_counter() - t0
    _write_results(out, cfg, metrics, artifacts)
    return metrics


def evaluate_checkpoint(path: str | Path, cfg: RunConfig | None, out: str | Path, progress: bool = True) -> dict:
    cfg = cfg or checkpoint_config(path)
    ensure_writable(Path(out))
    ensemble = load(path)
    metrics, artifacts = evaluate(ensemble, load_dataset(cfg.data, cfg.seed), cfg, progress=progress)
    _write_results(Path(out), cfg, metrics, artifacts)
    return metrics
