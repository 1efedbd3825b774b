"""`raysweep reproduce`: every shipped study, shrunk to tiny synthetic data, runs its variants as Ray
tasks, writes its report and plots, records its runs in MLflow and reuses finished runs."""
import contextlib
import copy
import json
import shutil

import pytest
import torch
import yaml
from conftest import repo_root
from mlflow import MlflowClient

from raysweep.core.data import load_dataset
from raysweep.errors import ConfigError, UserError
from raysweep.reproduce import STUDIES, plan, reproduce, study_file
from raysweep.reproduce.study import _run_variant, load_study
from raysweep.run import train_and_evaluate
from raysweep.training.trainer import EPOCH_STATE, fit

CAPS = {"max_iter": 2, "square_queries": 5, "max_steps": 20, "iterations": 2, "seeds": 1, "selection_size": 32,
        "binary_search_steps": 1, "samples": 24}
KEEP = {"jacobian_ensembles": ["standard", "jr_0.05", "snapshot_k3", "je_bagging_k3_0.2"],
        "robust_ensembles": ["single_eps_target", "alpha_k1", "alpha_k2"],
        "ensemble_adv": ["baseline", "ensemble2_adv"],
        "pdd_deg": ["baseline", "pdd_deg"]}
TINY_DATA = {"dataset": "synthetic", "train_size": 640, "test_size": 32, "batch_size": 64,
             "synthetic": {"num_classes": 4, "image_shape": [1, 28, 28], "noise": 0.3}}


def _cap(node):
    if isinstance(node, dict):
        return {k: min(v, CAPS[k.split(".")[-1]]) if k.split(".")[-1] in CAPS and isinstance(v, int)
                and not isinstance(v, bool) else _cap(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_cap(v) for v in node]
    return node


def tiny_study(module: str, tmp_path, keep=None):
    """The shipped study file, on tiny synthetic data, 1 epoch, attacks and evaluations capped."""
    spec = yaml.safe_load(study_file(module).read_text())
    spec = _cap(spec)
    spec["variants"] = {k: v for k, v in spec["variants"].items() if k in (keep or KEEP[module])}
    for v in spec["variants"].values():
        if "from" in v:
            v["from"] = str(study_file(module).parent / v["from"])
    common = spec.setdefault("common", {})
    common["data"] = TINY_DATA
    common.setdefault("train", {})["epochs"] = 1
    if module == "jacobian_ensembles":  # as the fair study's checks: the base's UAP iterations, not their own
        spec["checks"].pop("eval.uap.iterations")
    if isinstance(spec.get("base"), dict):
        spec["base"]["eval"]["jacobian_samples"] = min(spec["base"]["eval"].get("jacobian_samples", 0), 16)
    path = tmp_path / f"{module}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize("name", [n for n in STUDIES if n != "je-sweep"])
def test_study_runs_reports_and_reuses_finished_runs(name, tmp_path, ray_local):
    module = STUDIES[name]
    path = tiny_study(module, tmp_path)
    logs = []
    results = reproduce(name, out=str(tmp_path / "runs"), docs=str(tmp_path / "docs"), study_path=str(path),
                        log=logs.append)
    variants = [f"variants/{v}" for v in KEEP[module]]
    assert all("error" not in results[v] and 0 <= results[v]["clean_acc"] <= 1 for v in variants)
    report = (tmp_path / "docs" / "report.md").read_text()
    assert f"Compute: {len([k for k in results if 'error' not in results[k]])} runs, " in report
    assert all(v.split("/")[1] in report or load_study(path).variant(v.split("/")[1]).group in report for v in variants)
    for picture in [line[line.index("(") + 1:-1] for line in report.splitlines() if line.startswith("![")]:
        assert (tmp_path / "docs" / picture).stat().st_size > 1000
    stored = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert set(results) == set(stored)
    # every run is in MLflow, tagged with its study
    client = MlflowClient()
    exp = client.get_experiment_by_name(f"reproduce-{name}")
    runs = client.search_runs([exp.experiment_id], f"tags.`raysweep.study` = '{load_study(path).name}'")
    assert {r.data.tags["raysweep.variant"] for r in runs} >= set(variants)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert not [p for p in (tmp_path / "runs").rglob("*") if ".partial" in p.parts and p.is_file()]
    # a second call reuses every finished run and gives the same report
    again = []
    reproduce(name, out=str(tmp_path / "runs"), docs=str(tmp_path / "docs"), study_path=str(path), log=again.append)
    assert any("already done" in line for line in again) and not any(line.startswith("[") for line in again)
    assert (tmp_path / "docs" / "report.md").read_text() == report
    # --report-only of a study still running: what finished so far, the rest shown as not run, nothing trained
    missing = variants[-1]
    for folder in (tmp_path / "runs").rglob(missing.split("/")[1]):
        if folder.parent.name == "variants" and ".partial" not in folder.parts:
            shutil.rmtree(folder)
    partial = []
    reproduce(name, out=str(tmp_path / "runs"), docs=str(tmp_path / "partial"), study_path=str(path),
              log=partial.append, report_only=True)
    assert partial[0].endswith(f"{len(variants) - 1} of {len(variants)} runs finished in {tmp_path / 'runs'}; "
                               "the report covers those")
    assert "not run yet" in (tmp_path / "partial" / "report.md").read_text()
    assert not any(line.startswith("[") for line in partial) and not (tmp_path / "runs" / missing).exists()


def test_a_failing_variant_is_reported_and_the_others_finish(tmp_path, ray_local):
    path = tiny_study("jacobian_ensembles", tmp_path, keep=["standard", "snapshot_k9"])
    spec = yaml.safe_load(path.read_text())
    spec["variants"]["snapshot_k9"]["set"]["data.train_size"] = 64  # one step: 9 snapshots cannot be taken
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match="1 run.* failed: variants/snapshot_k9"):
        reproduce("jacobian-ensembles", out=str(tmp_path / "runs"), docs=str(tmp_path / "docs"), study_path=str(path),
                  log=lambda *_: None)
    stored = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert "snapshot" in stored["variants/snapshot_k9"]["error"]
    assert stored["variants/standard"]["clean_acc"] > 0
    assert "FAILED" in (tmp_path / "docs" / "report.md").read_text()


def test_an_interrupted_variant_continues_from_its_last_epoch(tmp_path, capsys):
    """A fair study's variant trains for an hour: killed in its second epoch, the study started again
    trains it from the end of the first (what it saved in the study's .partial folder), to the numbers
    of an uninterrupted run, and clears that folder once the variant is done."""
    path = tiny_study("jacobian_ensembles", tmp_path, keep=["standard"])
    spec = yaml.safe_load(path.read_text())
    spec["common"]["train"]["epochs"] = 2
    path.write_text(yaml.safe_dump(spec))
    variant = load_study(path).variant("standard")
    data = load_dataset(variant.cfg.data, variant.cfg.seed)
    partial = tmp_path / "runs" / ".partial" / "variants" / "standard"

    def kill_in_epoch_two(event, state):
        if event == "step" and len(state.history) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(variant.cfg, data, progress=False, callbacks=(kill_in_epoch_two,), resume_dir=partial / "epochs")
    first_epoch = torch.load(partial / "epochs" / EPOCH_STATE, weights_only=True)["trainer"]["train_state"]["history"]
    # --dry-run says what the study would go on from
    (standard,) = [v for v in plan("jacobian-ensembles", str(path), str(tmp_path / "runs"))["variants"]
                   if v["name"] == "standard"]
    assert not standard["done"] and standard["kept"] == "1 of 2 epochs trained"
    capsys.readouterr()
    metrics, files = _run_variant(variant.raw, None, "unused", {"raysweep.variant": "variants/standard"}, None,
                                  str(partial))
    lines = capsys.readouterr().out.splitlines()  # the study's log: a line per epoch trained, per stage evaluated
    assert [line.split("  ")[0] for line in lines if ": epoch " in line] == ["variants/standard: epoch 2/2"]
    evaluated = [line for line in lines if line.startswith("variants/standard: evaluation: ")]
    assert any("uap eps" in line for line in evaluated) and any(" uap done (" in line for line in evaluated)
    # the first epoch is the one the killed run trained (its own timing), not trained again
    assert metrics["train"]["history"][0] == first_epoch[0] and len(metrics["train"]["history"]) == 2
    whole = train_and_evaluate(variant.cfg, tmp_path / "whole", progress=False)
    assert metrics["clean_acc"] == whole["clean_acc"]
    assert [h["loss"] for h in metrics["train"]["history"]] == [h["loss"] for h in whole["train"]["history"]]
    assert any(f.startswith("checkpoint/") for f in files)  # the driver removes `partial` once it has them


def test_je_sweep_against_the_grid(tmp_path, ray_local):
    spec = _cap(yaml.safe_load(study_file("je_sweep").read_text()))
    spec["data"], spec["train"]["epochs"] = TINY_DATA, 1
    spec["eval"]["jacobian_samples"] = 0
    spec["search"].update(samples=2, params={"train.jr.lambda_jr": {"loguniform": [0.01, 1.0]},
                                             "ensemble.k": {"int": [2, 3]}, "ensemble.method": {"choice": ["bagging"]}})
    path = tmp_path / "je_sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    docs = tmp_path / "docs"
    (docs / "jacobian_ensembles").mkdir(parents=True)
    (docs / "jacobian_ensembles" / "results.json").write_text(json.dumps(  # a grid at three seeds, one failed
        {"variants/a": {"weighted_acc": 0.5, "clean_acc": 0.6, "total_seconds": 10.0},
         "variants/a@seed1": {"weighted_acc": 0.6, "clean_acc": 0.6, "total_seconds": 10.0},
         "variants/a@seed2": {"weighted_acc": 0.7, "clean_acc": 0.6, "total_seconds": 10.0},
         "variants/b": {"error": "x"}, "variants/c": {"weighted_acc": 0.55, "clean_acc": 0.6, "total_seconds": 5.0}}))
    results = reproduce("je-sweep", out=str(tmp_path / "runs"), docs=str(docs / "je_sweep"), study_path=str(path),
                        log=lambda *_: None)
    report = (docs / "je_sweep" / "report.md").read_text()
    assert "| grid (jacobian_ensembles): its best, `a` | 0.600 ± 0.248 | 0.600 ± 0.000 | 3 | 35 s (the whole grid) |" \
        in report
    assert report.count("| bagging |") == 2
    # the sweep's best point trained again at three more seeds: their mean with an interval
    best = results["sweep"]["best"]
    again = [results[f"best/seed{s}"] for s in (1, 2, 3)]
    for s in (1, 2, 3):
        cfg = yaml.safe_load((tmp_path / "runs" / "best" / f"seed{s}" / "config.yaml").read_text())
        assert cfg["seed"] == s and cfg["train"]["jr"]["lambda_jr"] == best["params"]["train.jr.lambda_jr"]
    mean = sum(m["weighted_acc"] for m in again) / 3
    assert f"| the same point trained again at seeds [1, 2, 3] | {mean:.3f} ± " in report


def test_study_errors_name_the_field(tmp_path):
    bad = {"study": "x", "base": {"seed": 0}, "variants": {"a": {"sett": {}}}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="variant 'a' has unknown keys \\['sett'\\]"):
        load_study(tmp_path / "a.yaml")
    bad = copy.deepcopy(bad)
    bad["variants"] = {"a": {"set": {"ensemble.kk": 3}}}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="kk"):
        load_study(tmp_path / "b.yaml")
    with pytest.raises(UserError, match="unknown study 'nope'"):
        reproduce("nope")


def test_shipped_studies_load():
    for module in STUDIES.values():
        path = study_file(module)
        assert path.is_file()
        if module != "je_sweep":
            assert load_study(path).variants
    assert (repo_root() / "search_spaces" / "reproduce").is_dir()


def test_sigterm_stops_a_study_as_ctrl_c_does_and_keeps_its_epochs(tmp_path, mlflow_store):
    """A fair study runs in the background for hours, where `&` makes it ignore SIGINT: `kill` (SIGTERM)
    is how it is stopped. It ends as interrupted (exit 130, no traceback, no fatal-signal dump), says how
    to continue, and the epochs its variants had finished are saved for that. Its log has every epoch's
    line of both variants training at once (Ray's log deduplication, which drops words with digits,
    would fold one variant's lines into the other's as "[repeated Nx across cluster]")."""
    import os
    import queue
    import signal
    import subprocess
    import sys
    import threading
    import time

    names = ["jr_0.05", "je_bagging_k3_0.2"]
    path = tiny_study("jacobian_ensembles", tmp_path, keep=names)
    spec = yaml.safe_load(path.read_text())
    spec["common"]["train"]["epochs"] = 200
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}  # its own Ray, not another test's
    proc = subprocess.Popen([sys.executable, "-m", "raysweep", "reproduce", "jacobian-ensembles", "--study", str(path),
                             "--out", str(tmp_path / "runs"), "--tracking-uri", mlflow_store(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines, q = [], queue.Queue()
    threading.Thread(target=lambda: [q.put(line) for line in proc.stdout] and None, daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(any(f"{n}: epoch 3/200" in line for line in lines)
                                                          for n in names):
            with contextlib.suppress(queue.Empty):
                lines.append(q.get(timeout=0.5))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.5)  # the reader thread's last lines
    while not q.empty():
        lines.append(q.get())
    out = "".join(lines)
    assert all(f"variants/{name}: epoch {n}/200" in out for name in names for n in (1, 2, 3)), out[-3000:]
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "SIGTERM received" not in out, out[-3000:]
    assert "interrupted; 0 of 2 runs are done" in out and "run the same command again" in out
    for name in names:
        assert (tmp_path / "runs" / ".partial" / "variants" / name / "epochs" / EPOCH_STATE).is_file()


def test_pdd_findings_use_the_kept_unit_choice_nearest_the_baseline_clean_accuracy(tmp_path):
    """The paper's PDD+DEG is as accurate as its baseline, so the fair report decides the findings first
    with the choice of kept units (rescaled by 1/p or not) whose clean accuracy is nearest the baseline's,
    whether above or below it, then with the other. The runs are the fair study's
    three baselines, their clean accuracies shifted for the two PDD+DEG choices."""
    from raysweep.reproduce import pdd_deg

    runs = repo_root() / "docs" / "results" / "pdd_deg_fair" / "runs" / "variants"
    base = {s: json.loads((runs / f"baseline{s}" / "metrics.json").read_text()) for s in ("", "@seed1", "@seed2")}
    results = {f"variants/{name}{s}": {**copy.deepcopy(m), "clean_acc": m["clean_acc"] + shift}
               for name, shift in (("baseline", 0.0), ("pdd", 0.03), ("pdd_deg", 0.03), ("pdd_rescaled", -0.01),
                                   ("pdd_deg_rescaled", -0.01)) for s, m in base.items()}
    report = pdd_deg.report(study_file("pdd_deg_fair"), results, tmp_path)
    assert "pdd_deg_rescaled comes first" in report, report
    assert report.index("| pdd_deg_rescaled vs baseline |") < report.index("| pdd_deg vs baseline |")
    for line in ("- pdd_deg: +0.030", "- pdd_deg_rescaled: -0.010", "- pdd_rescaled: -0.010"):
        assert line in report
    assert "| pdd_rescaled vs baseline |" in report and "| pdd_deg_rescaled vs adp |" not in report  # no ADP runs
