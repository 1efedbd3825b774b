"""The Ray executor against the local one: real local Ray, gloo, fractional CPUs per worker.

The method equivalence runs are packed: every config with the same worker count trains in one Ray
Train run (fit_pack_on_ray), and each must still equal its own single-process run. Ray Train's
start-up (~11 s here) is then paid once per worker count, not once per config; the single-config
path (fit_on_ray) is what the snapshot, metrics and GPU tests below run."""
import copy
import json
import time

import pytest
import torch
from conftest import make_cfg

from raysweep.config import validate_config
from raysweep.core.data import load_dataset
from raysweep.errors import ConfigError
from raysweep.members import make_local_executor
from raysweep.run import train_and_evaluate
from raysweep.training.ray import fit_on_ray, fit_pack_on_ray
from raysweep.training.trainer import build_members, fit, training_layout

RAY = {"kind": "ray", "ray": {"cpus_per_worker": 0.5}}

# Each method's ensemble-level exchange: JR (per-member penalties synced), Ensemble-Adv (input
# gradient all-reduced across ranks, sign steps), DEG (input gradients gathered, double backward),
# PDD (intervals and priorities from gathered features), ADP (joint terms on gathered logits).
METHODS = {
    "independent_jr": ({"method": "independent"}, {"jr": {"lambda_jr": 0.1}}),
    "ensemble_adv": ({"method": "joint"}, {"loss": "ensemble_ce",
                                           "adversarial": {"mode": "ensemble", "eps": 0.1, "steps": 3}}),
    "deg": ({"method": "joint"}, {"deg": {"lambda_deg": 0.5}}),
    "pdd": ({"method": "joint"}, {"pdd": {"m": 6, "period": 2}}),
    "adp": ({"method": "joint"}, {"adp": {}}),
    # bf16 autocast: the gathered logits travel as bf16, and the ranks still agree with one process.
    "jr_bf16": ({"method": "independent"}, {"jr": {"lambda_jr": 0.1}, "precision": "bf16"}),
}


def _cfg(method, k, executor=None, epochs=2, **data):
    ensemble, train = METHODS[method]
    return make_cfg(ensemble={**ensemble, "k": k}, data={"train_size": 96, "batch_size": 32, **data},
                    train={"epochs": epochs, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, **train},
                    executor=executor or RAY)


def _assert_same_members(got, ref, init):
    assert len(got) == len(ref)
    for mg, mr, m0 in zip(got, ref, init):
        for (name, pg), pr, p0 in zip(mg.named_parameters(), mr.parameters(), m0.parameters()):
            assert not torch.equal(pr, p0), f"{name} did not train"
            assert torch.allclose(pg, pr, atol=1e-5, rtol=0), (name, (pg - pr).abs().max().item())


def _local_reference(cfg, data):
    """All members looped in this process, at the workers' one thread: a different thread count changes
    float summation order in the convolutions, which ADP's near-singular log-det at initialisation
    amplifies ~1e6-fold. At equal threads and layout the two executors agree bit for bit."""
    members = build_members(cfg, data, cfg.ensemble.k)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # The layout the workers resolve (executor.channels_last): the same values either way, but NHWC
        # and NCHW kernels round differently, and ADP amplifies that as threads do.
        ex = make_local_executor(copy.deepcopy(members), "loop", "cpu", training_layout(cfg))
        ref = fit(cfg, data, progress=False, executor=ex)
    finally:
        torch.set_num_threads(threads)
    return ref, members


@pytest.fixture(scope="module")
def packed(ray_local, tmp_path_factory):
    """{(name, k): (cfg, data, TrainResult)}: every method at K=2 in one Ray Train run, and at K=3 with
    forward-mode JR in another."""
    out = {}
    for k in (2, 3):
        cfgs = {(method, k): _cfg(method, k) for method in sorted(METHODS)}
        if k == 3:
            cfgs[("forward_mode_jr", 3)] = fwd = _cfg("independent_jr", 3)
            fwd.train.jr.estimator = "forward_mode"
        datas = [load_dataset(c.data, 0) for c in cfgs.values()]
        got = fit_pack_on_ray(list(cfgs.values()), tmp_path_factory.mktemp("pack"), datas, progress=False)
        out.update({key: (c, d, r) for (key, c), d, r in zip(cfgs.items(), datas, got)})
    return out


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_ray_members_equal_local_members(packed, method, k):
    cfg, data, got = packed[(method, k)]
    ref, init = _local_reference(cfg, data)
    assert got.state.step == ref.state.step == 6
    _assert_same_members(got.ensemble.members, ref.ensemble.members, init)
    for a, b in zip(got.state.history, ref.state.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)  # every rank sees the whole ensemble's loss
    assert got.info["workers"] == k and got.info["backend"] == "gloo"
    assert got.info["bytes_per_step"] > 0 and got.info["packed"] == len(METHODS) + (k == 3)


def test_forward_mode_jr_across_workers(packed):
    """Forward-mode tangents pass through the gather (other workers' slots carry none): the same members
    as in one process."""
    cfg, data, got = packed[("forward_mode_jr", 3)]
    ref, init = _local_reference(cfg, data)
    _assert_same_members(got.ensemble.members, ref.ensemble.members, init)


def test_configs_that_need_other_workers_are_not_packed(ray_local, tmp_path):
    cfgs = [_cfg("deg", 2), _cfg("deg", 3)]
    with pytest.raises(ConfigError, match=r"config 1 \('run'\) cannot share a Ray Train run"):
        fit_pack_on_ray(cfgs, tmp_path, progress=False)


def test_vectorised_members_per_worker(ray_local, tmp_path):
    """Two workers holding two vmapped members each: same members as four looped in one process."""
    cfg = _cfg("deg", 4, {"kind": "ray", "vectorize": "vmap", "ray": {"cpus_per_worker": 0.5,
                                                                       "members_per_worker": 2}})
    data = load_dataset(cfg.data, 0)
    got = fit_on_ray(cfg, data, tmp_path, progress=False)
    ref, init = _local_reference(cfg, data)
    assert got.info["workers"] == 2
    _assert_same_members(got.ensemble.members, ref.ensemble.members, init)


def test_killed_worker_resumes_from_checkpoint(ray_local, tmp_path):
    """A pack of two configs; rank 1 dies in the second: the restarted worker group resumes the second
    config from its epoch-1 checkpoint and does not train the first again."""
    marker, resumed_at = tmp_path / "killed", tmp_path / "first-step-after-restart"

    def kill_rank1_once(event, state):
        # Runs inside every worker: rank 1 dies by SIGKILL in the middle of the second epoch of the
        # second config (the first has 3 steps in all), once; a worker process of the restarted group
        # notes the first step it trains.
        import os
        import signal
        import time

        import ray.train

        if event != "step":
            return
        fresh = "_RS_TEST_STEPPED" not in os.environ  # this worker process's first step
        os.environ["_RS_TEST_STEPPED"] = "1"
        if fresh and os.path.exists(marker) and not os.path.exists(resumed_at):
            with open(resumed_at, "w") as f:
                f.write(str(state.step))
        if state.step == 5 and ray.train.get_context().get_world_rank() == 1 and not os.path.exists(marker):
            # Ray Train's controller registers a reported checkpoint when it next polls the workers: a
            # kill within milliseconds of the epoch-1 report restarts from scratch (and, runs being
            # deterministic, ends with the same members: only the resumed step tells the difference).
            time.sleep(3)
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

    first, cfg = _cfg("independent_jr", 2, epochs=1), _cfg("deg", 2, epochs=3)
    data = load_dataset(cfg.data, 0)
    got_first, got = fit_pack_on_ray([first, cfg], tmp_path / "store", [data, data], progress=False,
                                     callbacks=(kill_rank1_once,))
    assert marker.exists(), "the worker was not killed"
    # Restarted in the second config from its epoch-1 checkpoint (3 steps an epoch): not from step 1 of
    # either config.
    assert resumed_at.read_text() == "4"
    ref, init = _local_reference(cfg, data)
    # Resumed from the end of epoch 1 with optimiser, random stream and PDD/driver state restored:
    # the same members as an uninterrupted run.
    assert got.state.step == ref.state.step == 9 and len(got.state.history) == 3
    _assert_same_members(got.ensemble.members, ref.ensemble.members, init)
    assert [round(r["loss"], 5) for r in got.state.history] == [round(r["loss"], 5) for r in ref.state.history]
    ref_first, init_first = _local_reference(first, data)
    _assert_same_members(got_first.ensemble.members, ref_first.ensemble.members, init_first)


def test_snapshot_runs_on_one_worker(ray_local, tmp_path):
    cfg = make_cfg(ensemble={"k": 2, "method": "snapshot"}, data={"train_size": 96, "batch_size": 32},
                   train={"epochs": 2, "optimizer": "sgd", "lr": 0.05}, executor=RAY)
    data = load_dataset(cfg.data, 0)
    got = fit_on_ray(cfg, data, tmp_path, progress=False)
    ref = fit(cfg, data, progress=False)
    assert got.info["workers"] == 1 and got.ensemble.k == 2
    for mg, mr in zip(got.ensemble.members, ref.ensemble.members):
        for pg, pr in zip(mg.parameters(), mr.parameters()):
            assert torch.allclose(pg, pr, atol=1e-5, rtol=0)


def test_more_gpus_than_the_cluster_has_fails_fast(ray_local, tmp_path):
    cfg = _cfg("deg", 2, {"kind": "ray", "ray": {"gpus_per_worker": 1}})
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"gpus_per_worker = 1 x 2 workers needs 2 GPUs, but the Ray cluster has 0"):
        fit_on_ray(cfg, load_dataset(cfg.data, 0), tmp_path, progress=False)
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("executor, message", [
    ({"kind": "ray", "ray": {"members_per_worker": 2}}, "members_per_worker = 2 must divide the 3"),
    ({"kind": "ray", "ray": {"backend": "nccl", "gpus_per_worker": 0.5}}, "nccl needs a whole GPU"),
    ({"kind": "ray", "device": "cuda"}, "executor.device = 'cuda' applies to the local executor"),
])
def test_bad_ray_settings_are_config_errors(executor, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(ensemble={"k": 3}, executor=executor)


def test_train_and_evaluate_writes_the_same_metrics(ray_local, tmp_path):
    cfg = _cfg("independent_jr", 2, epochs=1)
    local = validate_config({**cfg.model_dump(mode="json"), "executor": {"kind": "local", "vectorize": "loop"}})
    got = train_and_evaluate(cfg, tmp_path / "ray", progress=False)
    ref = train_and_evaluate(local, tmp_path / "local", progress=False)
    assert got.keys() == ref.keys()
    assert got["clean_acc"] == ref["clean_acc"]
    assert got["train"]["executor"] == "ray" and got["train"]["ray"]["workers"] == 2
    assert json.loads((tmp_path / "ray" / "metrics.json").read_text())["clean_acc"] == got["clean_acc"]
    assert (tmp_path / "ray" / "checkpoint" / "ensemble.json").is_file()
