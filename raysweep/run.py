"""One run end to end: train, checkpoint, evaluate, write metrics.json, config and pictures. The
CLI, sweep trials and reproduction studies call these. `evaluate` is the evaluation protocol: clean
accuracy, then every registered evaluation whose eval section is on (evaluation/, in registration
order), then the per-image worst case over the attacks at each eps."""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from raysweep import plots
from raysweep.config import RunConfig, checkpoint_config, current_identity, dump_config, run_identity, validate_config
from raysweep.core.checkpoint import MANIFEST_FILE, load, save_checkpoint
from raysweep.core.data import Dataset, load_dataset
from raysweep.core.ensemble import Ensemble
from raysweep.errors import UserError
from raysweep.evaluation import EVALUATIONS, EvalContext, EvalReport, resume
from raysweep.evaluation.robust import accuracies
from raysweep.members import make_local_executor
from raysweep.training.trainer import TrainResult, fit


def train_surrogate(raw: dict, data: Dataset, progress: bool = True, shared: str | Path | None = None,
                    log=None) -> Ensemble:
    """Trains a transfer surrogate (a raw run config, evaluation/transfer.py). With `shared`, a folder
    the runs of a study share, a surrogate trained there before for the same training (name and eval
    aside) is loaded instead: a type I surrogate drops every defence, so it is the same for every
    variant at a seed, and on this CPU it costs more than the variant itself. One cut off while training
    continues from its last epoch. The key leaves `executor` out, as a run's identity does: a surrogate
    trained under other executor settings equals this one to float rounding, not bit for bit."""
    cfg = validate_config(raw, "of a transfer surrogate")
    what = f"transfer surrogate {cfg.model.arch} (seed {cfg.seed})"

    def epoch_line(event, state):  # it trains for most of an hour where no progress bar shows
        if event == "epoch" and log is not None:
            log(f"evaluation: {what}: epoch {len(state.history)}/{cfg.train.epochs} "
                f"train acc {state.history[-1]['train_acc']:.4f} ({state.history[-1]['seconds']:.0f} s)")

    if shared is None:
        return fit(cfg, data, progress, callbacks=(epoch_line,)).ensemble
    # The digest names the shared folder. It hashes the text it had when run identities still held the
    # name (then set to "surrogate"), so the surrogates trained since stay found.
    identity = "name: surrogate\n" + run_identity(cfg, training=True)
    folder = Path(shared) / hashlib.sha256(identity.encode()).hexdigest()[:20]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a run that needs the same surrogate meanwhile waits, then loads it
        done = folder / "checkpoint"
        if (done / MANIFEST_FILE).is_file():
            if log is not None:
                log(f"evaluation: {what} loaded from {folder}")
            return load(done)
        ensemble = fit(cfg, data, progress, callbacks=(epoch_line,), resume_dir=folder / "epochs").ensemble
        tmp = folder / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(tmp, ensemble, cfg, data.image_shape, data.num_classes, data.mean, data.std)
        tmp.rename(done)  # whole or absent: a kill mid-save leaves only checkpoint.tmp
        shutil.rmtree(folder / "epochs", ignore_errors=True)
        return ensemble


def evaluate(ensemble: Ensemble, data: Dataset, cfg: RunConfig, progress: bool = True,
             resume_dir: str | Path | None = None, log=None, surrogates: str | Path | None = None) -> EvalReport:
    """The EvalReport of the ensemble under cfg.eval (its metrics.json is report.to_json()).
    `resume_dir`: a folder that outlives the process; each stage's share of the report is saved there as
    it ends, and an evaluation of the same ensemble and config started again loads the stages it finds
    instead of running them (evaluation/resume.py). Their seconds are the ones measured when they ran.
    `log(line)`: a line as each stage (each UAP eps, each attack run) ends, for logs where no progress bar shows.
    `surrogates`: a folder of transfer surrogates that runs share (train_surrogate)."""
    start = time.perf_counter()
    e = cfg.executor  # evaluation runs in fp32 whatever train.precision says (docs/performance.md)
    ex = make_local_executor(list(ensemble.members), e.vectorize, e.device, e.channels_last, e.compile)
    try:
        ex.train(False)
        keep = None if resume_dir is None else resume.folder_for(Path(resume_dir), ensemble, run_identity(cfg),
                                                                   current_identity)
        ctx = EvalContext(cfg, ensemble, data, ex, progress=progress, keep=keep, log=log,
                          train=lambda raw: train_surrogate(raw, data, progress, surrogates, log))
        report = EvalReport()
        clean, members = accuracies(ctx.stacked_fn, data.test, ctx.weights, ctx.how, cfg.eval.batch_size, ctx.device)
        report.add("clean_acc", clean, images=len(data.test))
        report.details.update(clean_acc=clean, member_clean_acc=members)
        stages, resumed = {"clean": time.perf_counter() - start}, []
        enabled = [(key, e) for key, e in EVALUATIONS.items() if e.enabled(getattr(cfg.eval, key))]
        with tqdm(enabled, desc="evaluation", unit="stage", disable=not progress, leave=False) as bar:
            for key, evaluation in bar:  # one stage per evaluation; the long ones show their own bar inside
                bar.set_postfix_str(key)
                saved = None if keep is None else resume.load_part(keep / f"{key}.pt")
                if saved is not None:
                    report.merge(saved["report"])
                    stages[key] = saved["seconds"]
                    resumed.append(key)
                    if log is not None:
                        log(f"evaluation: {key} kept from an earlier process ({saved['seconds']:.0f} s then)")
                    continue
                t, mark = time.perf_counter(), report.mark()
                evaluation(getattr(cfg.eval, key)).run(ctx, report)
                stages[key] = time.perf_counter() - t + ctx.kept_seconds.get(key, 0.0)
                if log is not None:
                    log(f"evaluation: {key} done ({stages[key]:.0f} s)")
                if keep is not None:
                    resume.save_part(keep / f"{key}.pt", {"report": report.since(mark), "seconds": stages[key]})
        report.add_worst_case()
    finally:
        # The ensemble is the caller's: back from the executor's layout (executor.channels_last) however
        # the evaluation ended, values unchanged.
        for member in ensemble.members:
            member.to(memory_format=torch.contiguous_format)
    report.details["eval_seconds"] = sum(stages.values())  # a resumed stage counts the time it took when it ran
    report.details["eval_stage_seconds"] = stages
    if resumed:
        report.details["eval_resumed"] = resumed
    return report


def _write_results(out: Path, cfg: RunConfig, metrics: dict, artifacts: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plots.robustness_curves(metrics, out / "acc_vs_eps.png")
    if artifacts.get("uap_deltas"):
        plots.uap_images(artifacts["uap_deltas"], out / "uap.png", artifacts.get("uap_example"))
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
                       ray_storage: str | None = None, epoch_metrics=None, data: Dataset | None = None,
                       resume_dir: str | Path | None = None, eval_log=None,
                       surrogates: str | Path | None = None, trained: TrainResult | None = None) -> dict:
    """`trained`: cfg's members trained already (a sweep's pack trains its points together); else
    trained here. `data`: cfg's dataset when the caller loaded it already (a sweep's pack of trials loads it once).
    `resume_dir` (local executor only): a folder that outlives the process. Training saves each epoch
    there and continues from it after an interruption (fit), and evaluation each finished stage under
    eval/ (evaluate). `surrogates`: see evaluate. A Ray executor run keeps its own checkpoints in
    `ray_storage` and resumes from them when its worker group restarts within the run, not across calls.
    `callbacks` (train.fit hooks) run in this process, so with the local executor only. A Ray run
    inside a Tune trial relays `epoch_metrics(row)` of each epoch to Tune instead (see fit_on_ray).
    `ray_storage`: where a Ray executor run keeps its checkpoints when executor.ray.storage is unset
    (a path or URI every node reaches; default `out/ray`)."""
    out = Path(out)
    ensure_writable(out)
    t0 = time.perf_counter()
    if data is None:
        data = load_dataset(cfg.data, cfg.seed)
    if trained is not None:
        result = trained
    elif cfg.executor.kind == "ray":
        from raysweep.training.ray import fit_on_ray

        result = fit_on_ray(cfg, data, ray_storage or out / "ray", progress=progress, epoch_metrics=epoch_metrics)
    else:
        result = fit(cfg, data, progress=progress, callbacks=callbacks, resume_dir=resume_dir)
    save_checkpoint(out / "checkpoint", result.ensemble, cfg, data.image_shape, data.num_classes, data.mean, data.std)
    try:
        report = evaluate(result.ensemble, data, cfg, progress=progress,
                          resume_dir=None if resume_dir is None else Path(resume_dir) / "eval", log=eval_log,
                          surrogates=surrogates)
    except Exception:
        print(f"raysweep: evaluation failed; the trained ensemble is saved: re-evaluate it with "
              f"`raysweep evaluate {out / 'checkpoint'}`", file=sys.stderr)
        raise
    metrics, artifacts = report.to_json(), report.artifacts
    metrics["train"] = {"seconds": result.seconds, "steps": result.state.step, "history": result.state.history,
                        "executor": cfg.executor.kind,
                        **({("ray" if cfg.executor.kind == "ray" else "pack"): result.info} if result.info else {})}
    # Trained in a pack (`trained`): the pack's training time, shared by its runs, plus its own evaluation.
    metrics["total_seconds"] = time.perf_counter() - t0 + (trained.seconds if trained is not None else 0.0)
    _write_results(out, cfg, metrics, artifacts)
    return metrics


def evaluate_checkpoint(path: str | Path, cfg: RunConfig | None, out: str | Path, progress: bool = True,
                        resume_dir: str | Path | None = None, log=None, surrogates: str | Path | None = None) -> dict:
    cfg = cfg or checkpoint_config(path)
    ensure_writable(Path(out))
    ensemble = load(path)
    report = evaluate(ensemble, load_dataset(cfg.data, cfg.seed), cfg, progress=progress, resume_dir=resume_dir,
                      log=log, surrogates=surrogates)
    metrics = report.to_json()
    _write_results(Path(out), cfg, metrics, report.artifacts)
    return metrics


def train_recorded(cfg: RunConfig, out: str | Path, *, mlflow: bool = True, tracking: str | None = None,
                   experiment: str | None = None, progress: bool = True) -> dict:
    """`raysweep train` (and raysweep.train): train and evaluate into `out`, recorded as one MLflow run in
    `tracking` (default $MLFLOW_TRACKING_URI, else ./mlflow.db) unless mlflow=False. Returns the metrics
    (metrics.json's content) with `mlflow_run_id` and `tracking_uri` when recorded."""
    if not mlflow:
        return train_and_evaluate(cfg, out, progress=progress)
    from raysweep.tracking.runs import DEFAULT_EXPERIMENT, log_train_run, tracking_uri

    uri = tracking_uri(tracking)
    metrics, run_id = log_train_run(cfg, Path(out), uri, experiment or DEFAULT_EXPERIMENT,
                                    lambda: train_and_evaluate(cfg, out, progress=progress))
    return {**metrics, "mlflow_run_id": run_id, "tracking_uri": uri}


def evaluate_saved(target: str, *, config: str | Path | None = None, overrides: list[str] = (),
                   out: str | Path | None = None, tracking: str | None = None,
                   progress: bool = True) -> tuple[dict, Path]:
    """`raysweep evaluate` (and raysweep.evaluate): re-evaluate a saved ensemble, named by a checkpoint
    folder (or the run folder holding it), models:/NAME@ALIAS, models:/NAME/VERSION or
    runs:/RUN_ID/checkpoint, under its stored config; the sections of the YAML `config` (e.g. eval:)
    replace the stored ones, then `overrides` apply. Returns (metrics, the folder they were written to)."""
    import yaml

    from raysweep.config import apply_overrides

    if target.startswith(("models:/", "runs:/")):
        from raysweep.tracking.registry import resolve_checkpoint

        ckpt = resolve_checkpoint(target, tracking)
        scheme, _, rest = target.partition(":/")
        out = out or Path("runs") / ("registry" if scheme == "models" else "mlflow-runs") / rest.strip("/").replace(
            "/", "_").replace("@", "_")
    else:
        ckpt = Path(target)
    if ckpt.is_dir() and (ckpt / "checkpoint").is_dir():  # a run directory was given
        ckpt = ckpt / "checkpoint"
    raw = checkpoint_config(ckpt).model_dump(mode="json")
    if config:
        path = Path(config)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        for section, value in (yaml.safe_load(path.read_text()) or {}).items():
            raw[section] = value  # sections given replace the stored ones (e.g. eval:, data:)
    cfg = validate_config(apply_overrides(raw, list(overrides)), str(config or ckpt))
    out = Path(out or ckpt.parent / "eval")
    return evaluate_checkpoint(ckpt, cfg, out, progress=progress), out
