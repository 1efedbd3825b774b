"""Sweeps with a real local Ray, real Optuna and a real MLflow SQLite store in a temp dir."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml
from conftest import repo_root
from mlflow import MlflowClient
from sweep_helpers import BASE, child_runs, sweep_dir, write_space

from raysweep import load
from raysweep.cli import main
from raysweep.config import validate_config
from raysweep.errors import ConfigError
from raysweep.run import train_and_evaluate
from raysweep.sweeps.space import load_search_space
from raysweep.sweeps.tune import _SweepSearch, run_sweep
from raysweep.tracking.registry import _using, register


@pytest.fixture(scope="module")
def sweep(ray_local, tmp_path_factory, mlflow_store):
    tmp = tmp_path_factory.mktemp("sweep")
    uri = mlflow_store(tmp)
    summary = run_sweep(str(write_space(tmp)), out=str(tmp / "out"), tracking=uri, register="synth-ens", progress=False)
    return summary, uri, tmp


def test_sweep_records_every_trial_in_mlflow(sweep, tmp_path):
    summary, uri, _ = sweep
    client = MlflowClient(uri)
    assert summary["trials"] == summary["finished"] == 3
    parent, children = child_runs(client, summary)
    assert len(children) == 3
    for run in children:
        assert run.info.status == "FINISHED"
        assert "train.jr.lambda_jr" in run.data.params and run.data.tags["searched.train.jr.lambda_jr"]
        assert run.data.tags["mlflow.user"] and len(run.data.tags["mlflow.source.git.commit"]) == 40
        assert {"weighted_acc", "clean_acc", "mean_uap_acc", "train/loss"} <= run.data.metrics.keys()
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics.json", "acc_vs_eps.png",
                                                                            "uap.png", "checkpoint"}
    assert {"tradeoff.png", "pareto.csv"} <= {a.path for a in client.list_artifacts(parent)}
    pareto = pd.read_csv(sweep_dir(summary) / "pareto.csv", dtype={"trial_id": str})
    assert 1 <= len(pareto) and set(pareto.trial_id) <= {r["trial_id"] for r in summary["finished_trials"]}
    # members under half their ensemble's clean accuracy (evaluation/report.weak_members), from each trial's
    # metrics.json into the summary and its MLflow tag (2 epochs on 256 images: a member can end below chance)
    from raysweep.evaluation.report import weak_members

    by_trial = {run.data.tags["raysweep.trial_id"]: run for run in children}
    for t in summary["finished_trials"]:
        run = by_trial[t["trial_id"]]
        metrics = json.loads(Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path)))
                             .read_text())
        assert t["weak_members"] == weak_members(metrics)
        assert run.data.tags.get("raysweep.weak_members", "") == ", ".join(map(str, t["weak_members"]))
    # What the MLflow UI shows: runs named by their sampled values and id, the whole config as params
    # (defaults too), a description on each run page
    for run in children:
        assert "lambda_jr=" in run.info.run_name and "method=" in run.info.run_name and run.info.run_name.endswith(
            run.data.tags["raysweep.trial_id"])
        assert run.data.params["eval.batch_size"] and run.data.params["train.schedule"]  # not in the YAML
        assert run.data.tags["mlflow.note.content"].startswith(f"Trial `{run.data.tags['raysweep.trial_id']}`")
    assert "Best: trial" in client.get_run(parent).data.tags["mlflow.note.content"]
    best = summary["best"]
    best_run = client.get_run(best["mlflow_run_id"])
    assert best_run.data.metrics["weighted_acc"] == pytest.approx(best["weighted_acc"])
    assert best["weighted_acc"] == max(r.data.metrics["weighted_acc"] for r in children)
    assert (sweep_dir(summary) / "best.yaml").is_file()


def test_optuna_drives_the_search(sweep):
    """The trials' values are the seeded Optuna study's: TPE's first draws, replayed standalone and
    as `raysweep sweep --dry-run` previews them."""
    summary, uri, tmp = sweep
    space = load_search_space(write_space(tmp, name="replay.yaml"))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=7))
    expected = []
    for _ in range(3):
        trial = study.ask()
        space.define_by_run(trial)
        expected.append(trial.params)
    res = subprocess.run([sys.executable, "-m", "raysweep", "sweep", str(tmp / "replay.yaml"), "--dry-run", "--json"],
                         capture_output=True, text=True, timeout=120, cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [p["params"] for p in json.loads(res.stdout)["points"]] == expected
    client = MlflowClient(uri)
    _, children = child_runs(client, summary)
    got = [{"train.jr.lambda_jr": float(r.data.tags["searched.train.jr.lambda_jr"]),
            "ensemble.method": r.data.tags["searched.ensemble.method"]} for r in children]
    key = lambda p: p["train.jr.lambda_jr"]  # noqa: E731
    for g, e in zip(sorted(got, key=key), sorted(expected, key=key)):
        assert g["ensemble.method"] == e["ensemble.method"]
        assert g["train.jr.lambda_jr"] == pytest.approx(e["train.jr.lambda_jr"], rel=1e-12)


def test_registry_champion_load_and_predict(sweep):
    summary, uri, tmp = sweep
    reg = summary["registered"]
    assert reg["version"] == 1 and reg["champion"]
    # --register re-evaluated the top two under the search space's protocol and registered the better
    candidates = summary["champion_candidates"]
    assert len(candidates) == 2 and {c["strong_objective"] for c in candidates} == {"protocol_acc/quick/0.1"}
    assert candidates[0]["strong_value"] >= candidates[1]["strong_value"]
    assert reg["strong_objective"] == "protocol_acc/quick/0.1" and float(reg["strong_value"]) == candidates[0][
        "strong_value"]
    run = MlflowClient(uri).get_run(candidates[0]["mlflow_run_id"])
    assert run.data.metrics["champion/protocol_acc/quick/0.1"] == candidates[0]["strong_value"]
    import mlflow

    # raysweep.load(models:/...) and pyfunc read MLflow's default store: set for this block only (a
    # process-wide mlflow.set_tracking_uri would send later tests' runs here).
    with _using(uri):
        ensemble = load(summary["best"]["checkpoint"])
        x = torch.rand(6, 1, 28, 28)
        expected = ensemble.predict_proba(x).numpy()
        pyfunc = mlflow.pyfunc.load_model("models:/synth-ens@champion")
        assert np.allclose(pyfunc.predict(x.numpy()), expected, atol=1e-6)
        assert np.allclose(pyfunc.predict(x.numpy().astype(np.float64)), expected, atol=1e-6)
        as_bytes = (x.numpy() * 255).round().astype(np.uint8)
        assert np.allclose(pyfunc.predict(as_bytes), ensemble.predict_proba(torch.from_numpy(as_bytes / 255.0).float()),
                           atol=1e-6)
        for bad, why in [(x.numpy()[:, 0], "got shape [6, 28, 28]"), (x.numpy() * 255, "got values in [0"),
                         (as_bytes.astype(np.int64), "got dtype int64")]:
            with pytest.raises(mlflow.exceptions.MlflowException) as err:
                pyfunc.predict(bad)
            message = str(err.value)
            assert why in message and "expected [B, 1, 28, 28]" in message and len(message) < 300, message
        # Logged as code: nothing pickled to run, and no bundled raysweep to shadow the installed one.
        stored = {p.relative_to(local).as_posix() for local in
                  [Path(mlflow.artifacts.download_artifacts("models:/synth-ens@champion"))] for p in local.rglob("*")}
        assert "code/pyfunc_model.py" in stored or "pyfunc_model.py" in stored, sorted(stored)
        assert not any(p.endswith(".pkl") or "raysweep/" in p for p in stored), sorted(stored)
        champion = load("models:/synth-ens@champion")
        assert torch.allclose(champion.predict_proba(x), torch.from_numpy(expected), atol=1e-6)
    # A worse later result gets a version but not the alias; a better one takes it.
    worse = register("synth-ens", summary["best"]["checkpoint"], summary["best"]["mlflow_run_id"], uri,
                     "weighted_acc", summary["best"]["weighted_acc"] - 0.1)
    assert worse["version"] == 2 and not worse["champion"]
    assert int(MlflowClient(uri).get_model_version_by_alias("synth-ens", "champion").version) == 1
    better = register("synth-ens", summary["best"]["checkpoint"], summary["best"]["mlflow_run_id"], uri,
                      "weighted_acc", summary["best"]["weighted_acc"] + 0.1)
    assert better["champion"] and int(MlflowClient(uri).get_model_version_by_alias("synth-ens", "champion").version) == 3


def test_champion_settles_on_the_best_version_when_registrations_race(sweep, tmp_path):
    """A stale writer (it read the champion before a better version arrived) leaves the alias on a worse
    version; the next registration re-reads every version and puts it back on the best. Then two
    processes register at once: the alias ends on the better of the two."""
    summary, uri, _ = sweep
    best = summary["best"]
    client = MlflowClient(uri)
    top = register("race-ens", best["checkpoint"], best["mlflow_run_id"], uri, "weighted_acc", 0.9)
    low = register("race-ens", best["checkpoint"], best["mlflow_run_id"], uri, "weighted_acc", 0.1)
    assert top["champion"] and not low["champion"]
    client.set_registered_model_alias("race-ens", "champion", str(low["version"]))  # the stale write
    mid = register("race-ens", best["checkpoint"], best["mlflow_run_id"], uri, "weighted_acc", 0.5)
    assert not mid["champion"]
    assert int(client.get_model_version_by_alias("race-ens", "champion").version) == top["version"]
    code = ("import sys, time, pathlib; from raysweep.tracking.registry import register; "
            "pathlib.Path(sys.argv[1] + '.ready').touch(); "  # imports done: wait for the other process
            "[time.sleep(0.05) for _ in range(1200) if len(list(pathlib.Path('.').glob('*.ready'))) < 2]; "
            f"register('duel-ens', {best['checkpoint']!r}, {best['mlflow_run_id']!r}, {uri!r}, 'weighted_acc', "
            "float(sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, v], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
             for v in ("0.3", "0.7")]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    champ = client.get_model_version_by_alias("duel-ens", "champion")
    assert champ.tags["objective_value"] == "0.7"


def test_a_champion_alias_another_writer_creates_meanwhile_is_no_error(sweep):
    """MLflow's SQL store sets an alias by reading, then inserting, so two writers creating the champion alias
    at once break its unique key. Played out here in the real store: another connection holds the write lock
    and commits the alias (on the worse version) only once the registration has read that there is none;
    the registration's insert then fails, and it must re-read and move the alias to the best version."""
    import sqlite3
    import threading

    from raysweep.tracking.registry import _settle_champion

    summary, uri, _ = sweep
    best = summary["best"]
    client = MlflowClient(uri)
    worse = register("lock-ens", best["checkpoint"], best["mlflow_run_id"], uri, "weighted_acc", 0.3)
    better = register("lock-ens", best["checkpoint"], best["mlflow_run_id"], uri, "weighted_acc", 0.7)
    client.delete_registered_model_alias("lock-ens", "champion")
    other = sqlite3.connect(uri.removeprefix("sqlite:///"), isolation_level=None, timeout=60)
    (workspace,) = other.execute("SELECT workspace FROM registered_models WHERE name = 'lock-ens'").fetchone()
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO registered_model_aliases (workspace, name, alias, version) VALUES (?, ?, ?, ?)",
                  (workspace, "lock-ens", "champion", worse["version"]))
    out = {}

    def settle():
        try:
            out["final"] = _settle_champion(client, "lock-ens", {"objective": "weighted_acc"})
        except Exception as err:  # noqa: BLE001 - reported below
            out["error"] = err
    thread = threading.Thread(target=settle)
    thread.start()
    try:
        time.sleep(3)  # it has read that there is no alias, and waits for the write lock to insert one
        waiting = thread.is_alive()  # then the alias it read as missing is committed under it
    finally:  # the lock is let go whatever happens: the module's later tests share this store
        other.execute("COMMIT")
        other.close()
        thread.join(120)
    assert waiting, out
    assert "error" not in out, out.get("error")
    assert out["final"] == better["version"]
    assert int(client.get_model_version_by_alias("lock-ens", "champion").version) == better["version"]


def test_evaluate_cli_loads_from_the_registry(sweep, tmp_path):
    summary, uri, _ = sweep
    res = subprocess.run([sys.executable, "-m", "raysweep", "evaluate", "models:/synth-ens/1", "--tracking-uri", uri,
                          "--out", str(tmp_path / "ev"), "--quiet"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["clean_acc"] == pytest.approx(summary["best"]["clean_acc"])


def test_infeasible_points_are_reported_not_fatal(ray_local, tmp_path, mlflow_store):
    search = {"objective": "clean_acc", "samples": 4, "seed": 1, "color_by": None,
              "params": {"train.pdd.m": {"int": [2, 5]}}}
    path = write_space(tmp_path, search, ensemble={"k": 3, "method": "joint"},
                  train={"epochs": 1, "optimizer": "adam", "lr": 0.001, "pdd": {"m": 6}},
                  eval={"uap": None, "jacobian_samples": 0, "diversity_samples": 0})
    uri = mlflow_store(tmp_path)
    summary = run_sweep(str(path), out=str(tmp_path / "out"), tracking=uri,
                        progress=False, storage=f"file://{tmp_path / 'store'}")  # a pyarrow URI
    assert list((tmp_path / "store" / "synth-1").glob("experiment_state-*.json"))
    best = summary["best"]  # the trial's results are in the storage, where the summary says
    assert best["storage"].startswith(f"file://{tmp_path / 'store'}") and best["checkpoint"].startswith("runs:/")
    stored = best["storage"].removeprefix("file://")
    assert json.loads(open(f"{stored}/metrics.json").read())["clean_acc"] == pytest.approx(best["clean_acc"])
    assert load(f"{stored}/checkpoint").k == 3
    assert summary["trials"] == 4 and summary["infeasible"] >= 1 and summary["failed"] == 0
    assert summary["finished"] + summary["infeasible"] == 4
    assert summary["best"]["params"]["train.pdd.m"] > 3
    client = MlflowClient(uri)
    _, children = child_runs(client, summary)
    flagged = [r for r in children if "raysweep.infeasible" in r.data.tags]
    assert len(flagged) == summary["infeasible"] and all(r.info.status == "FINISHED" for r in children)


@pytest.mark.parametrize("search, message", [
    ({"params": {"train.jr.lambda_jr": {"normal": [0, 1]}}}, "unknown distribution 'normal'"),
    ({"params": {"train.jr.lambda_jr": {"uniform": [1.0, 0.1]}}}, "low 1.0 > high 0.1"),
    ({"params": {"train.jr.lamda": {"uniform": [0, 1]}}}, "unknown parameter path 'train.jr.lamda'"),
    ({"params": {"train.jr.lambda_jr": {"loguniform": [0, 1]}}}, "loguniform needs low > 0"),
    ({"objective": "auc"}, "needs eval.auc"),
    ({"objective": ["clean_acc", "weighted_acc"], "asha": {}}, "drop search.asha"),
    ({"asha": {"metric": "probe_acc"}}, "needs train.probe"),
    ({"pack": 4, "asha": {}}, "search.pack 4 with search.asha"),
    ({"pack": 0}, "search.pack"),
    # ranges checked against the run schema's bounds before any trial (not trial by trial)
    ({"params": {"train.jr.lambda_jr": {"uniform": [0.0, 5.0]}}}, "reaches 5.0, but train.jr.lambda_jr must be <= 2"),
    ({"params": {"ensemble.k": {"int": [0, 4]}}}, "reaches 0, but ensemble.k must be >= 1"),
    ({"params": {"ensemble.method": {"choice": ["bagging", "boosting"]}}}, "'boosting' is not allowed"),
])
def test_malformed_search_space_is_a_clear_error(tmp_path, search, message):
    search = dict(search)
    executor = search.pop("executor", None)
    with pytest.raises(ConfigError, match=message):
        load_search_space(write_space(tmp_path, search, **({"executor": executor} if executor else {})))


def test_a_pack_is_one_optuna_trial_per_point_told_as_each_ends():
    """search.pack: each Tune trial gets `pack` points, the last one what is left of the sweep's samples;
    a point is told as its last report arrives; points a failed trial never reported are FAIL."""
    def space(trial):  # define-by-run, as SearchSpace.define_by_run
        trial.suggest_float("x", 0.0, 1.0)

    search = _SweepSearch(space=space, metric="acc", mode="max",
                          sampler=optuna.samplers.TPESampler(seed=0), pack=2, total=3)
    first, second = search.suggest("a"), search.suggest("b")
    assert [len(first["pack"]), len(second["pack"])] == [2, 1]
    search.on_trial_result("a", {"pack_member": 0, "acc": 0.5})
    assert [t.state.name for t in search._ot_study.trials] == ["COMPLETE", "RUNNING", "RUNNING"]
    search.on_trial_complete("a", {"pack_member": 1, "error": "ValueError: bad"})
    search.on_trial_complete("b", None, error=True)
    trials = search._ot_study.trials
    assert [(t.user_attrs["tune_trial_id"], t.state.name, t.value) for t in trials] == [
        ("a-0", "COMPLETE", 0.5), ("a-1", "FAIL", None), ("b-0", "FAIL", None)]
    assert [t.params for t in trials] == first["pack"] + second["pack"]


def test_malformed_space_fails_before_any_trial_through_the_cli(tmp_path):
    path = write_space(tmp_path, {"params": {"model.depth": {"int": [1, 3]}}})
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "raysweep", "sweep", str(path), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2 and "unknown parameter path 'model.depth'" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("args, message", [
    (["--resume"], "no sweep in"),
    (["--samples", "0"], "at least 1 trial"),
    (["--register", "bad/name"], "registered model name"),
    (["--storage", "/proc/nope"], "cannot write there"),
    (["--tracking-uri", "http://127.0.0.1:9"], "cannot reach an MLflow server"),
])
def test_bad_sweep_input_fails_before_any_trial(tmp_path, capsys, args, message):
    """Through the CLI's entry point in this process (an unexpected exception fails the test); the
    malformed-space test above runs the command in its own process."""
    path = write_space(tmp_path)
    code = main(["sweep", str(path), "--out", str(tmp_path / "o"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                 *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err[-3000:]
    assert "Traceback" not in err and not (tmp_path / "o" / "synth-1").exists()


def test_train_cli_records_one_mlflow_run(tmp_path, mlflow_store):
    cfg = {k: v for k, v in BASE.items()}
    cfg["train"] = {**cfg["train"], "epochs": 1}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    uri = mlflow_store(tmp_path)
    res = subprocess.run([sys.executable, "-m", "raysweep", "train", str(path), "--out", str(tmp_path / "r"),
                          "--tracking-uri", uri, "--quiet"], capture_output=True, text=True, timeout=600,
                         cwd=repo_root())
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("raysweep").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "1"
    assert run.data.metrics["clean_acc"] == json.loads((tmp_path / "r" / "metrics.json").read_text())["clean_acc"]


def test_asha_stops_trials_and_their_runs_are_closed(ray_local, tmp_path, mlflow_store):
    """Seed 10 draws learning rates good, bad, good, bad (Optuna's seeded start-up sampling): a trial at
    1e-5 has learnt nothing after one epoch, below the rung's median, and ASHA must stop it."""
    search = {"samples": 4, "max_concurrent": 1, "seed": 10, "color_by": None,
              "params": {"train.lr": {"choice": [0.003, 0.00001]}},
              "asha": {"metric": "probe_acc", "grace_period": 1, "reduction_factor": 2}}
    path = write_space(tmp_path, search, train={"epochs": 3, "optimizer": "adam", "lr": 0.001,
                                           "probe": {"eps": 0.02, "steps": 2, "samples": 64}})
    uri = mlflow_store(tmp_path)
    summary = run_sweep(str(path), out=str(tmp_path / "out"), tracking=uri, progress=False)
    assert summary["finished"] + summary["stopped_early"] == 4 and summary["finished"] >= 1
    assert summary["stopped_early"] >= 1, "ASHA stopped no trial: the test would not see a broken scheduler"
    assert all(t["params"]["train.lr"] == 0.003 for t in summary["finished_trials"])
    client = MlflowClient(uri)
    _, children = child_runs(client, summary)
    statuses = sorted(r.info.status for r in children)
    assert statuses.count("KILLED") == summary["stopped_early"] and statuses.count("FINISHED") == summary["finished"]
    for run in children:  # ASHA's reading, per epoch, also in MLflow
        assert 0 in {m.step for m in client.get_metric_history(run.info.run_id, "train/probe_acc")}


def test_the_epoch_relay_loads_without_the_sweep_stack():
    """A Ray-executor trial's per-epoch relay travels to Ray Train's controller and to every worker with
    the run's callbacks: loading it there must not import the trial's stack (MLflow, Ray, torch; it cost
    the controller ~8 CPU-seconds when the relay lived in sweeps/trial.py)."""
    from ray import cloudpickle

    from raysweep.sweeps.epochs import relay

    code = ("import pickle, sys; f = pickle.loads(sys.stdin.buffer.read()); "
            "print(f({'epoch': 0, 'train_acc': 0.5, 'loss': 1.0})['mlflow_run_id'], "
            "[m for m in ('mlflow', 'ray', 'torch', 'raysweep.sweeps.trial') if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], input=cloudpickle.dumps(relay(3, "run-1")),
                         capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert res.stdout.decode().split() == ["run-1", "[]"]


def test_sweep_of_ray_executor_trials(ray_local, tmp_path, mlflow_store):
    """Each trial trains with one Ray Train worker per member; a trial holds 0.5 + 2 x 0.5 CPUs, so the
    2-CPU cluster runs one trial at a time. Epochs reach Tune (ASHA) and MLflow as they end, relayed
    from the workers; Ray Train's checkpoints go to the sweep's storage. Seed 10 draws a good then a bad
    learning rate (as in the ASHA test above): ASHA stops the second trial after its first epoch, and
    its run must not show the epoch ASHA never saw, though its Ray Train run trained on meanwhile.
    A second Ray instance runs on the machine meanwhile (as two local sweeps would): Ray Train's
    placement-group cleaner must still find its own cluster and free the stopped trial's CPUs."""
    search = {"samples": 2, "trial_cpus": 0.5, "seed": 10, "color_by": None,
              "params": {"train.lr": {"choice": [0.003, 0.00001]}},
              "asha": {"grace_period": 1, "reduction_factor": 2}}
    path = write_space(tmp_path, search, executor={"kind": "ray", "ray": {"cpus_per_worker": 0.5}},
                  train={**BASE["train"], "epochs": 2})
    from raysweep.sweeps.tune import _max_concurrent

    assert _max_concurrent(load_search_space(path)) == 1
    uri = mlflow_store(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import ray, time; ray.init(address='local', num_cpus=0, "
                              "include_dashboard=False); print('up', flush=True); time.sleep(600)"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert other.stdout.readline().strip() == "up"
        summary = run_sweep(str(path), out=str(tmp_path / "out"), tracking=uri, progress=False,
                            storage=str(tmp_path / "store"))
        deadline = time.time() + 30  # the cleaner looks every second or so
        while ray_local.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
            time.sleep(0.5)
    finally:
        other.send_signal(signal.SIGINT)  # its driver shuts its Ray down
        try:
            other.wait(timeout=30)
        except subprocess.TimeoutExpired:
            other.kill()
    assert ray_local.available_resources().get("CPU", 0) == 2, ray_local.util.placement_group_table()
    assert (summary["finished"], summary["stopped_early"]) == (1, 1)
    assert json.loads((sweep_dir(summary) / "summary.json").read_text())["best"]["weighted_acc"] > 0
    client = MlflowClient(uri)
    assert sorted(r.info.status for r in child_runs(client, summary)[1]) == ["FINISHED", "KILLED"]
    for run in child_runs(client, summary)[1]:  # the first epoch (step 0) is logged live, from the relay only
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/train_acc")}
        assert steps == ({0, 1} if run.info.status == "FINISHED" else {0})
    assert list((tmp_path / "store" / "ray-train").glob("*/checkpoint_*"))


@pytest.mark.parametrize("name", ["jacobian_ensembles_sweep", "robust_ensembles_sweep", "ensemble_adv_sweep",
                                  "pdd_deg_sweep"])
def test_shipped_search_spaces_load_and_sample(name):
    from raysweep.config import validate_config

    space = load_search_space(repo_root() / "search_spaces" / f"{name}.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    feasible = 0
    for _ in range(5):
        trial = study.ask()
        space.define_by_run(trial)
        try:
            cfg = validate_config(space.trial_config(trial.params))
        except ConfigError as err:
            assert "pdd.m must be > ensemble.k" in str(err)  # the one infeasible region, by design
            continue
        feasible += 1
        if "train.adversarial.eps" in space.search.params:  # per-member: one eps per sampled member
            assert len(cfg.train.adversarial.eps) == cfg.ensemble.k
    assert feasible >= 1


def test_a_pack_trains_its_points_together_each_as_alone(ray_local, tmp_path, mlflow_store):
    """search.pack 3 over lambda_JR and the learning rate: the Tune trial trains its three points as one
    pack of 3 x K members (training/pack.py), and each point is still its own MLflow run, with its epochs
    logged as they ended, and ends with the metrics it has alone."""
    search = {"objective": "weighted_acc", "samples": 3, "seed": 3, "color_by": None, "pack": 3,
              "params": {"train.jr.lambda_jr": {"loguniform": [0.01, 1.0]}, "train.lr": {"loguniform": [5e-4, 5e-3]}}}
    path = write_space(tmp_path, search)
    uri = mlflow_store(tmp_path)
    summary = run_sweep(str(path), out=str(tmp_path / "out"), tracking=uri, progress=False)
    assert summary["finished"] == 3
    client = MlflowClient(uri)
    _, children = child_runs(client, summary)
    assert len(children) == 3 and {r.info.status for r in children} == {"FINISHED"}
    assert len({r.data.tags["raysweep.tune_trial_id"] for r in children}) == 1
    for run in children:
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2  # both epochs, in its own run
    records = [json.loads(p.read_text()) for p in (sweep_dir(summary) / "trials").glob("*.json")]
    assert all(r["metrics"]["train"]["pack"] == {"packed": 3} for r in records)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trial's actor ran at one thread (Ray's OMP_NUM_THREADS for one CPU)
    try:
        for r in records[:2]:
            alone = train_and_evaluate(validate_config(load_search_space(path).trial_config(r["params"])),
                                       tmp_path / f"alone-{r['trial_id']}", progress=False)
            assert r["metrics"]["weighted_acc"] == pytest.approx(alone["weighted_acc"], abs=1e-9)
            assert [h["loss"] for h in r["metrics"]["train"]["history"]] == pytest.approx(
                [h["loss"] for h in alone["train"]["history"]], abs=1e-5)  # fp32 rounding: ~1e-6 seen
    finally:
        torch.set_num_threads(threads)


def test_failed_trials_are_recorded_failed_and_the_sweep_goes_on(ray_local, tmp_path, mlflow_store):
    """Seed 0 draws mnist, synthetic, mnist; MNIST is not on this machine and downloads are off, so two
    trials raise at data loading. Their MLflow runs end FAILED, keeping the params they had logged.
    Packed two to a Tune trial (search.pack): the failed first trial of a pack does not stop its second,
    and each trial of a pack is its own MLflow run, Optuna trial and record, trained exactly as alone."""
    search = {"objective": "clean_acc", "samples": 3, "seed": 0, "color_by": None, "max_failures": 2, "pack": 2,
              "params": {"data.dataset": {"choice": ["synthetic", "mnist"]}}}
    empty = tmp_path / "empty"
    empty.mkdir()
    path = write_space(tmp_path, search, data={**BASE["data"], "download": False, "data_dir": str(empty)},
                  eval={"uap": None, "jacobian_samples": 0, "diversity_samples": 0})
    uri = mlflow_store(tmp_path)
    summary = run_sweep(str(path), out=str(tmp_path / "out"), tracking=uri, progress=False)
    assert (summary["failed"], summary["finished"]) == (2, 1)
    _, children = child_runs(MlflowClient(uri), summary)
    failed = [r for r in children if r.info.status == "FAILED"]
    # A Python error is not retried (max_failures is for dead processes and nodes): one run per trial,
    # with its error as a tag and its traceback as an artifact.
    assert len(failed) == 2 and all(r.data.params["data.dataset"] == "mnist" for r in failed)
    client = MlflowClient(uri)
    for run in failed:
        assert "not found" in run.data.tags["raysweep.error"]
        local = client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path / run.info.run_id))
        assert "Traceback" in open(local).read()
    records = [json.loads(p.read_text()) for p in (sweep_dir(summary) / "trials").glob("*.json")]
    assert sorted(r["status"] for r in records) == ["failed", "failed", "finished"]
    # Two Tune trials: a pack of two (failed, finished) and a pack of one
    packs = {}
    for run in children:
        packs.setdefault(run.data.tags["raysweep.tune_trial_id"], []).append(run.data.tags["raysweep.trial_id"])
    assert sorted(map(sorted, packs.values()), key=len) == sorted(
        ([f"{t}-{j}" for j in range(len(ids))] for t, ids in packs.items()), key=len)
    assert sorted(map(len, packs.values())) == [1, 2]
    state = json.loads((sweep_dir(summary) / "sweep.json").read_text())
    study = optuna.load_study(study_name=state["study_name"], storage=state["optuna_storage"])
    by_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert sorted(by_id) == sorted(r["trial_id"] for r in records)
    for r in records:
        t = by_id[r["trial_id"]]
        assert t.params == r["params"]
        assert (t.state, t.value) == ((optuna.trial.TrialState.COMPLETE, r["clean_acc"]) if r["status"] == "finished"
                                      else (optuna.trial.TrialState.FAIL, None))
    # The finished trial (second of its pack, after a failed one) trained exactly as alone
    done = next(r for r in records if r["status"] == "finished")
    first = next(r for r in records if r["trial_id"] == done["trial_id"][:-1] + "0")
    assert done["trial_id"].endswith("-1") and first["status"] == "failed"
    assert json.loads((Path(done["storage"]) / "metrics.json").read_text())["clean_acc"] == done["clean_acc"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trial's actor ran at one thread (Ray's OMP_NUM_THREADS for one CPU); another
    try:                      # count changes float summation order, by ~1e-8 in the losses on some CPUs
        alone = train_and_evaluate(validate_config(load_search_space(path).trial_config(done["params"])),
                                   tmp_path / "alone", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert done["metrics"]["clean_acc"] == alone["clean_acc"]
    assert [h["loss"] for h in done["metrics"]["train"]["history"]] == [h["loss"] for h in alone["train"]["history"]]
    # A trial whose run FINISHED but whose result never reached the driver (the sweep was interrupted in
    # between) is adopted from MLflow on --resume: recorded as finished, not trained again.
    finished = next(p for p in (sweep_dir(summary) / "trials").glob("*.json") if "finished" in p.read_text())
    before = json.loads(finished.read_text())
    finished.unlink()
    resumed = run_sweep(None, out=str(tmp_path / "out"), resume=True, progress=False)
    assert (resumed["failed"], resumed["finished"]) == (2, 1) and resumed["status"] == "finished"
    after = json.loads(finished.read_text())
    assert after["adopted_from_mlflow"] and after["clean_acc"] == before["clean_acc"]
    assert after["params"] == before["params"] and after["mlflow_run_id"] == before["mlflow_run_id"]
    assert len(child_runs(MlflowClient(uri), resumed)[1]) == 3  # no new trial ran
