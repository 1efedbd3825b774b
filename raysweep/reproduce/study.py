"""A study: named variants of one run config, each trained and evaluated as a Ray task (one CPU or
GPU share each, so a 2-core machine runs two at once and a cluster runs many), every run recorded
in MLflow, results cached per variant so a re-run or an interrupted run only does what is missing; a
variant interrupted while training continues from its last finished epoch, and one interrupted while
evaluated from its last saved evaluation part (evaluation/resume.py: a stage, an attack run, a UAP
eps or its last minute; `.partial/` in the study's folder holds them meanwhile).

Study file (search_spaces/reproduce/*.yaml):
    study: NAME
    base: {run config} | path/to/config.yaml    # relative to the study file
    common: {sections deep-merged into every variant, e.g. the shared eval}
    seeds: [0, 1, 2]                            # optional: every variant at each seed
    variants:
      VARIANT: {group: LABEL, from: other_config.yaml, set: {dotted.path: value}}

With `seeds`, a variant's first seed is its run `variants/VARIANT` (the one the tables of single
runs and the checks read) and each further seed S is `variants/VARIANT@seedS`; reproduce/stats.py
turns them into means, intervals and verdicts.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from raysweep.config import (
    RunConfig,
    absolute_paths,
    read_yaml,
    same_run,
    set_path,
    validate_config,
)
from raysweep.core.files import atomic_write
from raysweep.errors import ConfigError
from raysweep.terminal import on_sigterm

VARIANT_KEYS = {"group", "from", "set"}
STUDY_KEYS = {"study", "base", "common", "seeds", "variants", "checks"}


@dataclass
class Variant:
    name: str
    group: str
    raw: dict
    cfg: RunConfig


@dataclass
class Job:
    key: str          # "variants/NAME[@seedS]" or "checks/NAME"
    raw: dict
    cfg: RunConfig
    checkpoint: str | None = None


@dataclass
class Study:
    name: str
    path: Path
    variants: list[Variant]
    spec: dict = field(default_factory=dict)
    seeds: list[int] | None = None  # None: each variant once, at its config's seed

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def seed_runs(self, v: Variant) -> list[tuple[str, dict]]:
        """(result key, raw config) of each of the variant's runs: one per seed."""
        if not self.seeds:
            return [(f"variants/{v.name}", v.raw)]
        runs = []
        for i, seed in enumerate(self.seeds):
            raw = {**copy.deepcopy(v.raw), "seed": seed}
            runs.append((f"variants/{v.name}" if i == 0 else f"variants/{v.name}@seed{seed}", raw))
        return runs

    def jobs(self) -> list[Job]:
        return [Job(key, raw, v.cfg if i == 0 else validate_config(raw, f"{self.path} variant {v.name!r}"))
                for v in self.variants for i, (key, raw) in enumerate(self.seed_runs(v))]


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _config_at(ref, here: Path, what: str) -> dict:
    if isinstance(ref, dict):
        return ref
    if isinstance(ref, str):
        return read_yaml(here / ref, what)
    raise ConfigError(f"{what}: expected a run config mapping or a file path, got {ref!r}")


def load_study(path: str | Path) -> Study:
    """Every variant's config is validated here, before anything runs."""
    path = Path(path)
    spec = read_yaml(path, "study")
    unknown = set(spec) - STUDY_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: {', '.join(sorted(STUDY_KEYS))}")
    seeds = spec.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                              or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"{path}: seeds: {seeds!r}; expected a list of distinct integers, e.g. [0, 1, 2]")
    if not spec.get("variants"):
        raise ConfigError(f"{path}: 'variants' must name at least one variant")
    name = spec.get("study") or path.stem
    variants = []
    for vname, v in spec["variants"].items():
        v = v or {}
        bad = set(v) - VARIANT_KEYS
        if bad:
            raise ConfigError(f"{path}: variant {vname!r} has unknown keys {sorted(bad)}; allowed: {sorted(VARIANT_KEYS)}")
        if "from" in v:
            raw = _config_at(v["from"], path.parent, f"variant {vname!r} from")
        elif "base" in spec:
            raw = _config_at(spec["base"], path.parent, "base")
        else:
            raise ConfigError(f"{path}: variant {vname!r} has no 'from' and the study has no 'base'")
        raw = deep_merge(raw, spec.get("common") or {})
        for dotted, value in (v.get("set") or {}).items():
            if seeds is not None and dotted == "seed":
                raise ConfigError(f"{path}: variant {vname!r} sets seed, and the study runs every variant at seeds "
                                  f"{seeds}: drop one of the two")
            set_path(raw, dotted.split("."), value, f"variant {vname!r} set {dotted!r}")
        if seeds is not None:
            raw["seed"] = seeds[0]
        raw["name"] = f"{name}-{vname}"
        raw = absolute_paths(raw, path.parent.resolve())
        variants.append(Variant(vname, v.get("group", vname), raw, validate_config(raw, f"{path} variant {vname!r}")))
    return Study(name, path, variants, spec, seeds)


LOG_LINE = r": (epoch \d+/\d+  loss |evaluation: )"  # what a variant's epoch and evaluation lines have
PARTIAL = ".partial"  # under a study's folder: runs cut off, by epoch and evaluation stage
SURROGATES = "surrogates"  # under a study's folder: transfer surrogates its variants share (not in git: retrained)


def _cached(out: Path, cfg: RunConfig) -> dict | None:
    """The variant's metrics when `out` holds a finished run of exactly this config."""
    m, c = out / "metrics.json", out / "config.yaml"
    if m.is_file() and c.is_file() and same_run(c.read_text(), cfg):
        return json.loads(m.read_text())
    return None


def kept_progress(out: Path, key: str, cfg: RunConfig, checkpoint: Path | None = None) -> str | None:
    """What `out/.partial` keeps of run `key` that was cut off, in words (None: nothing): its trained
    epochs, and the evaluation parts saved so far, both only where they belong to this very config (and
    for the evaluation, these trained weights: `checkpoint`, by default the cut-off run's own), since a
    study started again goes on from those and discards the rest."""
    from raysweep.config import current_identity, run_identity
    from raysweep.core.checkpoint import MANIFEST_FILE, load
    from raysweep.evaluation.resume import find
    from raysweep.training.trainer import saved_epochs

    work, said = out / PARTIAL / key, []
    saved = saved_epochs(work / "epochs", cfg) if (work / "epochs").is_dir() else None
    if saved is not None:
        history = saved.get("trainer", {}).get("train_state", {}).get("history", [])
        said.append(f"{len(history)} of {cfg.train.epochs} epochs trained")
    checkpoint = checkpoint or work / "run" / "checkpoint"
    if (checkpoint / MANIFEST_FILE).is_file():
        # under epochs/eval for a run that trains, eval/ for one that evaluates a checkpoint
        ensemble, text = load(checkpoint), run_identity(cfg)
        found = [p for root in (work / "epochs" / "eval", work / "eval")
                 if (kept := find(root, ensemble, text, current_identity)) for p in kept.glob("*")]
        done = sorted(p.stem for p in found if p.suffix == ".pt")  # whole stages
        begun = []
        for stage in sorted(p for p in found if p.is_dir() and p.name not in done):  # a stage's own parts
            finished = [p for p in stage.glob("*.pt") if not p.name.endswith(".running.pt")]
            under_way = len(list(stage.glob("*.running.pt")))
            if finished or under_way:
                begun.append(f"{stage.name} ({len(finished)} part{'s' * (len(finished) != 1)}"
                             + (f", {under_way} under way" if under_way else "") + ")")
        if done or begun:
            said.append("evaluation kept: " + ", ".join(done + begun))
    return "; ".join(said) or None


def _files(root: Path) -> dict[str, bytes]:
    """A run directory's files (Ray Train's own checkpoint folder aside) as bytes, to travel back to
    the head: the node that ran a variant may be another machine, gone by the time the report is built."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != "ray"}


def _write_files(files: dict[str, bytes], root: Path) -> None:
    # metrics.json last: _cached takes a folder holding it for a finished run
    for rel, data in sorted(files.items(), key=lambda f: f[0] == "metrics.json"):
        atomic_write(root / rel, data)  # a report written meanwhile (--report-only) reads no half file


def _run_variant(raw: dict, uri: str | None, experiment: str, tags: dict,
                 checkpoint: dict[str, bytes] | None, partial: str | None,
                 driver_node: str | None = None, surrogates: str | None = None) -> tuple[dict, dict[str, bytes]]:
    """One Ray task: train + evaluate (or, given a checkpoint's files, evaluate that checkpoint under
    this config's eval), recorded as one MLflow run. Returns (metrics, the run directory's files).

    On the driver's node (`driver_node`; None: this process is the driver), the task works in
    `partial`, a folder of the driver's that outlives the task: the members and the trainer's state
    are saved there after every epoch, and the evaluation's parts as they end, so a study
    started again continues the variant from its last saved epoch or stage; the driver removes it once
    it holds the variant's files. On another node the task works in a scratch folder of its own.
    `surrogates`: the study's folder of transfer surrogates, shared by its variants on the driver's node
    (run.train_surrogate): a type I surrogate is trained once per seed, not once per variant."""
    import ray

    from raysweep.run import evaluate_checkpoint, train_and_evaluate
    from raysweep.tracking.runs import log_train_run

    cfg = validate_config(raw)
    here = driver_node is None or ray.get_runtime_context().get_node_id() == driver_node
    with tempfile.TemporaryDirectory(prefix="raysweep-") as tmp:
        work = Path(partial) if partial and here else Path(tmp)
        shared = surrogates if here else None
        out = work / "run"
        shutil.rmtree(out, ignore_errors=True)  # an interrupted attempt's outputs; only epochs/ carries over
        if checkpoint:
            _write_files(checkpoint, Path(tmp) / "checkpoint")

        name = tags.get("raysweep.variant", cfg.name)
        line = lambda text: print(f"{name}: {text}", flush=True)  # noqa: E731 - on the study's log (LOG_LINE)

        def epoch_line(event, state):  # a variant trains and evaluates for hours: its log says how far it is
            if event == "epoch":
                row, n = state.history[-1], len(state.history)
                line(f"epoch {n}/{cfg.train.epochs}  loss {row['loss']:.4f}  train acc {row['train_acc']:.4f}"
                     f"  ({row['seconds']:.0f} s)" + ("; evaluating" if n == cfg.train.epochs else ""))

        def run():
            if checkpoint:
                return evaluate_checkpoint(Path(tmp) / "checkpoint", cfg, out, progress=False, resume_dir=work / "eval",
                                           log=line, surrogates=shared)
            return train_and_evaluate(cfg, out, progress=False, callbacks=(epoch_line,), resume_dir=work / "epochs",
                                      eval_log=line, surrogates=shared)

        if uri is None:
            metrics = run()
        else:
            metrics, run_id = log_train_run(cfg, out, uri, experiment, run, tags)
            metrics = {**metrics, "mlflow_run_id": run_id}
        return metrics, _files(out)


def run_jobs(jobs: list[Job], out: Path, study: str, *, uri: str | None, experiment: str, address: str | None,
             cpus_per_job: float = 1.0, gpus_per_job: float = 0.0, log=print) -> dict[str, dict]:
    """Runs the jobs as Ray tasks, as many at once as the cluster's resources allow; a job that fails
    is reported as {"error": ...} and the others go on. Results finished earlier are reused."""
    results: dict[str, dict] = {}
    todo = []
    for job in jobs:
        cached = _cached(out / job.key, job.cfg)
        if cached is not None:
            results[job.key] = cached
        else:
            todo.append(job)
    if len(results):
        log(f"{study}: {len(results)} of {len(jobs)} runs already done in {out} (reused)")
    if not todo:
        return results

    # The variants' log lines differ only in their numbers, which Ray's log deduplication masks: it would
    # print the first and fold the others into "[repeated Nx across cluster]". Read when ray is imported.
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", LOG_LINE)
    import ray

    from raysweep.training.ray import connect

    connect(address)
    task = ray.remote(num_cpus=cpus_per_job, num_gpus=gpus_per_job, max_retries=0)(_run_variant)
    t0 = time.perf_counter()
    pending = {task.remote(j.raw, uri, experiment,
                           {"raysweep.kind": "reproduce", "raysweep.study": study, "raysweep.variant": j.key},
                           _files(Path(j.checkpoint)) if j.checkpoint else None,
                           str((out / PARTIAL / j.key).resolve()),
                           ray.get_runtime_context().get_node_id(),
                           str((out / SURROGATES).resolve())): j for j in todo}
    done_count = len(results)
    # SIGTERM stops a study as Ctrl-C does: a study started in the background with `&` ignores SIGINT
    with on_sigterm(_interrupt):
        try:
            _collect(pending, results, out, done_count, len(jobs), t0, log)
        except KeyboardInterrupt:
            log(f"{study}: interrupted; {sum('error' not in r for r in results.values())} of {len(jobs)} runs are done "
                f"in {out}, and a run cut off continues from its last saved epoch or evaluation stage: run the "
                "same command again")
            raise
    return results


def _interrupt() -> None:
    raise KeyboardInterrupt


def _collect(pending: dict, results: dict, out: Path, done_count: int, total: int, t0: float, log) -> None:
    """Each job's result as it finishes: its files written to `out` (the cache), its .partial removed."""
    import ray

    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ready[0])
        done_count += 1
        try:
            m, files = ray.get(ready[0])
            _write_files(files, out / job.key)  # on this machine: the cache, the checks and the report read it
            shutil.rmtree(out / PARTIAL / job.key, ignore_errors=True)  # its epochs: the run is safe now
            results[job.key] = m
            seconds = m.get('total_seconds', m.get('eval_seconds', 0))
            log(f"[{done_count}/{total}] {job.key}: clean {m['clean_acc']:.4f}"
                f"  ({seconds:.0f} s; {time.perf_counter() - t0:.0f} s elapsed)")
        except Exception as err:  # noqa: BLE001 - one variant's failure must not lose the others
            results[job.key] = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:500]}"}
            log(f"[{done_count}/{total}] {job.key}: FAILED {results[job.key]['error']}")


def check_job(study: Study, name: str, variant: str, overrides: dict, out: Path) -> Job:
    """Re-evaluate a trained variant's checkpoint under a stronger evaluation (more steps, more seeds,
    AutoAttack): a robustness claim must survive it."""
    v = study.variant(variant)
    raw = copy.deepcopy(v.raw)
    for dotted, value in overrides.items():
        set_path(raw, dotted.split("."), value, f"check {name!r} {dotted!r}")
    raw["name"] = f"{study.name}-check-{name}"
    return Job(f"checks/{name}", raw, validate_config(raw, f"check {name!r}"),
               checkpoint=str(out / "variants" / variant / "checkpoint"))


def finished_runs(study: Study, out: Path) -> dict[str, dict]:
    """Every run of the study that `out` holds finished, variants and checks, without training anything:
    what a study running in the background (or stopped halfway) has found so far."""
    results = {job.key: m for job in study.jobs() if (m := _cached(out / job.key, job.cfg)) is not None}
    overrides = study.spec.get("checks")
    for folder in sorted((out / "checks").glob("*")) if overrides else []:
        if folder.name in {v.name for v in study.variants}:
            job = check_job(study, folder.name, folder.name, overrides, out)
            if (m := _cached(out / job.key, job.cfg)) is not None:
                results[job.key] = m
    return results
