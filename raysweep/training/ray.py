"""The Ray executor: a Ray Train TorchTrainer with one worker per member (or per
`executor.ray.members_per_worker` members), each worker running the same Trainer (trainer.py) over
a DistributedMembers executor (members/distributed.py). docs/ray_executor.md has the step protocol.

Roles:
- Every rank builds all K members from the one seeded stream (so member k starts exactly as in a
  local run), keeps its own, and runs step.py on gathered stacks. Decisions that need all members
  (PDD intervals and priorities, DEG cosines, the Ensemble-Adv input, snapshot times) are computed
  from the same gathered bytes on every rank, so they agree with no extra round trip.
- `Reporter`: every rank holds one (all ranks call ray.train.report, a barrier); rank 0's writes the
  trainer state (schedule position, random stream, PDD statistics, the method's snapshots) into
  every checkpoint next to each rank's member weights and optimiser state, and reports the epoch
  metrics. On a restart every rank restores from that checkpoint.
- `fit_on_ray`, in the calling process: checks the cluster can hold the workers (fail fast, no
  hang), starts the run, and assembles the Ensemble from the final checkpoint.
- `fit_pack_on_ray`: several configs that share the worker group trained one after another in one
  run, paying Ray Train's start-up once; each config ends exactly as it would alone.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raysweep.config import RunConfig, absolute_paths, validate_config
from raysweep.config.schema import RayExecutorConfig
from raysweep.core.data import Dataset, load_dataset
from raysweep.core.ensemble import Ensemble
from raysweep.errors import ConfigError, UserError
from raysweep.members.distributed import DistributedMembers
from raysweep.members.local import make_local_executor

STATE_FILE = "trainer_state.pt"  # rank 0's Trainer.state_dict() less the optimiser


def _member_file(k: int) -> str:
    return f"member{k}.safetensors"


def _optimizer_file(rank: int) -> str:
    return f"optimizer_rank{rank}.pt"


def num_workers(cfg: RunConfig) -> int:
    return cfg.trained_members // cfg.executor.ray.members_per_worker


def backend(r: RayExecutorConfig) -> str:
    if r.backend != "auto":
        return r.backend
    return "nccl" if r.gpus_per_worker >= 1 else "gloo"


class Reporter:
    """Each rank's end of ray.train.report: all ranks report (a barrier) and write their own members'
    weights and optimiser state; rank 0 adds the metrics and the trainer state."""

    def __init__(self, rank: int, first_member: int):
        self.rank, self.first = rank, first_member
        self.is_rank0 = rank == 0

    def restore(self, trainer, checkpoint) -> None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, weights_only=True)
            state["optimizer"] = torch.load(Path(d) / _optimizer_file(self.rank), weights_only=True)
        trainer.load_state_dict(state)

    def report(self, trainer, row: dict, with_checkpoint: bool, extra: dict) -> None:
        import ray.train

        metrics = {**row, "step": trainer.state.step, **extra} if self.is_rank0 else {}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        sd = trainer.state_dict()
        with tempfile.TemporaryDirectory() as d:
            for i, member in enumerate(trainer.ex.export_members()):
                weights = {n: t.detach().cpu().contiguous() for n, t in member.state_dict().items()}
                save_file(weights, os.path.join(d, _member_file(self.first + i)))
            torch.save(sd.pop("optimizer"), os.path.join(d, _optimizer_file(self.rank)))
            if self.is_rank0:
                torch.save({**sd, "pack_index": extra["pack_index"]}, os.path.join(d, STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _train_one(cfg: RunConfig, data: Dataset, index: int, checkpoint, config: dict) -> None:
    """This rank's part of training one config of the pack, from `checkpoint` when it is this config's."""
    import ray.train
    import ray.train.torch

    from raysweep.training.trainer import Trainer, build_members, training_layout

    r = cfg.executor.ray
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device() if r.gpus_per_worker > 0 else torch.device("cpu")
    n = r.members_per_worker
    first = rank * n
    mine = build_members(cfg, data, cfg.trained_members)[first:first + n]
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            for i, member in enumerate(mine):
                member.load_state_dict(load_file(os.path.join(d, _member_file(first + i))))
    local = make_local_executor(mine, cfg.executor.vectorize, str(device), training_layout(cfg), cfg.executor.compile)
    executor = DistributedMembers(local, cfg.trained_members)
    reporter = Reporter(rank, first)
    trainer = Trainer(cfg, data, executor, progress=False)
    if checkpoint is not None:
        reporter.restore(trainer, checkpoint)
    while not trainer.done:
        received, steps_before = executor.bytes_received, trainer.state.step
        row = trainer.run_epoch(config.get("callbacks", ()))
        steps = trainer.state.step - steps_before
        # pack_final ranks the checkpoints Ray Train keeps: every config's last one outranks the rest.
        extra = {"bytes_per_step": (executor.bytes_received - received) / max(steps, 1),
                 "restored": checkpoint is not None, "pack_index": index,
                 "pack_final": index + 1 if trainer.done else 0}
        epoch = len(trainer.state.history)
        if reporter.is_rank0 and config.get("progress"):
            print(f"[raysweep] {cfg.name} epoch {epoch}/{cfg.train.epochs} loss {row['loss']:.4f} "
                  f"train_acc {row['train_acc']:.4f} ({row['seconds']:.1f} s)", flush=True)
        reporter.report(trainer, row, epoch % r.checkpoint_every == 0 or trainer.done, extra)


def _worker_loop(config: dict) -> None:
    """Every config of the pack in turn, in this one worker group (one process group, one start-up);
    after a restart, from the config the checkpoint belongs to (the ones before it are done)."""
    import ray.train

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # see fit_on_ray: one line per epoch instead
    cfgs = [validate_config(c, "sent to the Ray worker") for c in config["cfgs"]]
    checkpoint = ray.train.get_checkpoint()
    start = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start = torch.load(Path(d) / STATE_FILE, weights_only=True)["pack_index"]
    datasets = {}  # configs of a pack often share their data: load it once
    for index in range(start, len(cfgs)):
        cfg = cfgs[index]
        key = (cfg.data.model_dump_json(), cfg.seed)
        if key not in datasets:
            datasets[key] = load_dataset(cfg.data, cfg.seed)
        _train_one(cfg, datasets[key], index, checkpoint if index == start else None, config)


def check_resources(cfg: RunConfig) -> None:
    """Fail fast when the cluster cannot hold the worker group (Ray would wait forever)."""
    import ray

    r, workers = cfg.executor.ray, num_workers(cfg)
    if r.wait_for_resources:
        return
    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for name, per, field in (("CPU", r.cpus_per_worker, "cpus_per_worker"), ("GPU", r.gpus_per_worker,
                                                                              "gpus_per_worker")):
        need, have = per * workers, total.get(name, 0.0)
        largest = max((n.get(name, 0.0) for n in nodes), default=0.0)
        hint = (f"lower executor.ray.{field}, raise executor.ray.members_per_worker, or set "
                f"executor.ray.wait_for_resources: true on an autoscaling cluster")
        if need > have + 1e-9:
            raise ConfigError(f"executor.ray.{field} = {per:g} x {workers} workers needs {need:g} {name}s, but the "
                              f"Ray cluster has {have:g}: {hint}")
        if per > largest + 1e-9:
            raise ConfigError(f"executor.ray.{field} = {per:g}, but no Ray node has more than {largest:g} {name}s: "
                              f"{hint}")


# The job's runtime env wherever raysweep starts or joins Ray: every worker first runs worker_setup.setup.
WORKER_ENV = {"worker_process_setup_hook": "raysweep.training.worker_setup.setup"}


def _where(address: str | None) -> str:
    return f"--address {address!r} (or $RAY_ADDRESS)"


def check_address(address: str | None = None) -> str | None:
    """`address` or $RAY_ADDRESS (None: neither is set), checked: a malformed HOST:PORT, or one with nothing
    listening, is an error at once (ray.init would wait for minutes). Commands call it before their first
    side effect (an MLflow store, an output folder), so a typo costs seconds and leaves nothing behind."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    where = _where(address)
    if address and "://" not in address and address not in ("auto", "local"):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"{where}: expected HOST:PORT of a Ray head (e.g. 10.0.0.1:6379), ray://HOST:PORT, "
                            "'auto' or 'local'")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as err:
            raise UserError(f"{where}: no Ray head answers there ({err.strerror or err}); start one with "
                            "`ray start --head` or fix the address") from None
    return address


def connect(address: str | None = None) -> None:
    """Join `address` or $RAY_ADDRESS when set, else start (or join) a local Ray; no-op if connected."""
    import ray

    if ray.is_initialized():
        return
    address = check_address(address)
    where = _where(address)
    try:
        ray.init(address=address, logging_level="warning", runtime_env=WORKER_ENV)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise UserError(f"{where}: cannot join a Ray cluster there: {str(err).strip().splitlines()[0][:300]}") from None
    except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception when its processes miss their 30 s start
        what = f"{where}: cannot join a Ray cluster there" if address not in (None, "local") else \
            "cannot start a local Ray instance"
        raise UserError(f"{what}: {str(err).strip().splitlines()[0][:300]} A machine too busy for Ray's processes to "
                        "start in time does this: run the command again, or start Ray yourself (`ray start --head`) "
                        "and pass its address with --address") from None


def _epoch_relay(to_metrics, queue):
    """A Ray Train callback that puts each epoch's report (rank 0's row) into `queue`, from which the
    enclosing Tune trial reports it as its own (`_fit_relaying`). `to_metrics(row)` picks what Tune sees
    (None: skip the epoch). Runs in Train's controller, so `to_metrics` must pickle."""
    from ray.train import UserCallback

    class EpochRelay(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            out = to_metrics(metrics[0])
            if out is not None:
                queue.put(out)  # blocks while the trial's previous epoch waits for Tune's decision

    return EpochRelay()


def _fit_relaying(trainer, queue):
    """`trainer.fit()`, each epoch its relay puts in `queue` reported to Tune from THIS thread, the trial's.
    Tune reports are synchronous: `ray.tune.report` returns only once the driver decided to go on
    (ASHA), and raises SystemExit when it stopped the trial. Ray's TuneReportCallback hands the epochs
    to Tune from its actor's main thread instead, so a trial that the driver stopped late (under load)
    had already trained on, evaluated and logged to MLflow what ASHA never saw. Here the trial stops
    at the report, whatever its Ray Train run did meanwhile (at most one epoch more: the queue holds one)."""
    import threading

    import ray.tune
    from ray.util.queue import Empty

    outcome = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the trial's thread, raised there
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="raysweep-ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive() or not queue.empty():
        try:
            ray.tune.report(queue.get(timeout=0.5))
        except Empty:
            pass
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def storage_path(storage: str | Path) -> str:
    """A pyarrow URI as given, or a local path made absolute (Ray Tune and Train need one)."""
    if "://" in str(storage):
        return str(storage).rstrip("/")
    return str(Path(storage).expanduser().resolve())


def warn_if_local_storage(storage: str, flag: str) -> None:
    """A local path is one disk per node: on a cluster of several nodes, say so (results written by
    other nodes would land on their own disks)."""
    import ray

    nodes = sum(n["Alive"] for n in ray.nodes())
    if nodes > 1 and "://" not in storage:
        print(f"raysweep: {flag} {storage} is a local path on a {nodes}-node cluster: every node must see it (a "
              "shared mount), else give an s3:// or gs:// URI", file=sys.stderr)


def fit_on_ray(cfg: RunConfig, data: Dataset, storage: str | Path, progress: bool = True, callbacks=(),
               epoch_metrics=None):
    """Train with one Ray Train worker per member group; returns a TrainResult like train.fit.
    `storage`: where checkpoints go when executor.ray.storage is unset. `callbacks` run in every
    worker (picklable `fn(event, state)`, as for train.fit). `epoch_metrics(row) -> dict | None`: inside
    a Tune trial, what of each epoch's row the trial reports to Tune as the epoch ends (ASHA, MLflow)."""
    return fit_pack_on_ray([cfg], storage, [data], progress, callbacks, epoch_metrics)[0]


def _check_pack(cfgs: list[RunConfig]) -> None:
    """Configs packed into one Ray Train run share its worker group: same workers, same resources."""
    first = cfgs[0]
    for i, cfg in enumerate(cfgs[1:], 1):
        if cfg.executor.ray != first.executor.ray or num_workers(cfg) != num_workers(first):
            raise ConfigError(f"config {i} ({cfg.name!r}) cannot share a Ray Train run with config 0 ({first.name!r}): "
                              f"packed configs run in one worker group, so executor.ray and the number of workers "
                              f"must match ({num_workers(cfg)} workers, {cfg.executor.ray.model_dump()} against "
                              f"{num_workers(first)} workers, {first.executor.ray.model_dump()})")


def fit_pack_on_ray(cfgs: list[RunConfig], storage: str | Path, datas: list[Dataset] | None = None,
                    progress: bool = True, callbacks=(), epoch_metrics=None) -> list:
    """Train several configs one after another in ONE Ray Train run (one worker group), returning one
    TrainResult per config, each the same as fit_on_ray of that config alone. What a pack saves is the
    run's start-up: Ray Train's controller and helper actors and one process per worker, with torch
    imported and the process group formed (~11 s and ~20 CPU-seconds on a 2-core machine, against a
    fraction of a second of training for a small test run). The configs must share executor.ray and
    their worker count. A restart resumes the config its last checkpoint belongs to; finished configs
    are not trained again. `datas`: the configs' datasets, loaded here when not given (the driver
    needs only their shapes, to assemble the ensembles)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from raysweep.training.trainer import TrainResult, TrainState, build_members

    _check_pack(cfgs)
    cfg0 = cfgs[0]
    connect()
    check_resources(cfg0)
    r = cfg0.executor.ray
    storage = r.storage or storage_path(storage)
    warn_if_local_storage(storage, "executor.ray.storage")
    pack = f"-pack{len(cfgs)}" if len(cfgs) > 1 else ""
    name = f"{cfg0.name}{pack}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if k.startswith("RAYSWEEP_")}
    # Ray Train's worker logging prints every report and checkpoint at INFO, and its LoggingConfig
    # level does not reach those lines (Ray 2.60): plain Python logging (WARNING) in the workers;
    # rank 0 prints one line per epoch instead.
    env.setdefault("RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING", "0")
    # Ray Train's controller polls its workers every 2 s by default, so every run waits ~2 s past its
    # end and at each phase change: 0.2 s takes ~4 s off every run (15 s -> 11 s for a 2-worker run
    # of 0.2 s of training, this CPU). One tiny remote call per worker per poll. Yours if you set it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    gpus = {"GPU": r.gpus_per_worker} if r.gpus_per_worker else {}
    # Inside a Tune trial, each epoch goes to Tune through this queue (one at a time: see _fit_relaying).
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0}) if epoch_metrics else None
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfgs": [absolute_paths(c.model_dump(mode="json"), Path.cwd()) for c in cfgs],
                           "progress": progress, "callbacks": tuple(callbacks)},
        torch_config=TorchConfig(backend=backend(r)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers(cfg0), use_gpu=r.gpus_per_worker > 0,
            resources_per_worker={"CPU": r.cpus_per_worker, **gpus}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, worker_runtime_env={"env_vars": env},
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            # Kept: every config's last checkpoint (its result) and one more; Ray Train also always keeps
            # the latest, which a restart resumes from.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=len(cfgs) + 1,
                                                         checkpoint_score_attribute="pack_final"),
            callbacks=[_epoch_relay(epoch_metrics, queue)] if queue is not None else None,
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    t0 = time.perf_counter()
    try:
        result = _fit_relaying(trainer, queue) if queue is not None else trainer.fit()  # (an empty Queue is falsy)
    except ray.train.TrainingFailedError as err:
        raise UserError(f"Ray training of {cfg0.name!r}{f' and {len(cfgs) - 1} more packed' if pack else ''} failed "
                        f"after {r.max_failures} restart(s); checkpoints so far are under {storage}/{name}: "
                        f"{err}") from err
    seconds = time.perf_counter() - t0
    finals = {m["pack_final"] - 1: (c, m) for c, m in result.best_checkpoints or [] if m.get("pack_final")}
    results = []
    for index, cfg in enumerate(cfgs):
        checkpoint, last = finals[index]
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, weights_only=True)
            trained = [load_file(os.path.join(d, _member_file(k))) for k in range(cfg.trained_members)]
        method = cfg.method(cfg.ensemble.k, state["train_state"]["total_steps"])  # assembles the ensemble, as locally
        method.load_state_dict(state["method"])
        weights = method.ensemble_state(trained)
        data = datas[index] if datas is not None else load_dataset(cfg.data, cfg.seed)
        members = build_members(cfg, data, len(weights))
        for member, w in zip(members, weights):
            member.load_state_dict(w)
        ensemble_weights = torch.tensor(cfg.ensemble.weights) if cfg.ensemble.weights else None
        ensemble = Ensemble([m.eval() for m in members], ensemble_weights, cfg.ensemble.combine)
        info = {"workers": num_workers(cfg), "backend": backend(r), "wall_seconds": seconds, "packed": len(cfgs),
                "checkpoint": checkpoint.path, "bytes_per_step": last.get("bytes_per_step")}
        results.append(TrainResult(ensemble, TrainState(**state["train_state"]), state["seconds"], info))
    return results
