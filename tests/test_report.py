"""The typed evaluation report: named results, the per-image worst case, metrics.json schemas."""
from pathlib import Path

import pytest
import torch
from conftest import make_cfg

from raysweep.attacks.pgd import AttackConfig, robust_accuracy
from raysweep.errors import ConfigError, UserError
from raysweep.evaluation.report import scalars_of
from raysweep.run import evaluate
from raysweep.sweeps.objectives import Objective, check_objective, produced_results
from raysweep.tracking.runs import flat_metrics

ATTACKS = [{"name": "pgd_ce", "eps": [0.05, 0.1], "steps": 5},
           {"name": "pgd_cw", "eps": [0.1], "steps": 5, "objectives": ["cw_margin"], "random_start": False}]


def test_worst_case_is_the_per_image_and_of_every_attack_at_an_eps(trained_synthetic):
    _, data, ensemble = trained_synthetic
    cfg = make_cfg(ensemble={"k": 3}, data={"train_size": 768, "test_size": 200},
                   eval={"attacks": ATTACKS, "uap": None, "jacobian_samples": 0, "diversity_samples": 0})
    report = evaluate(ensemble, data, cfg, progress=False)
    s = report.scalars()
    assert set(s) == set(produced_results(cfg))  # what the sweep checks objectives against is what runs
    flags = [robust_accuracy(ensemble.stacked_logits, data.test, AttackConfig(**a), 0.1, ensemble.weights,
                             "probability", cfg.eval.batch_size, "cpu", cfg.seed)[1] for a in ATTACKS]
    assert s["robust_acc/pgd_ce/0.1"] == flags[0].sum().item() / len(flags[0])
    by_hand = (flags[0] & flags[1]).sum().item() / len(flags[0])
    assert s["worst_acc/linf/0.1"] == by_hand <= min(s["robust_acc/pgd_ce/0.1"], s["robust_acc/pgd_cw/0.1"])
    assert s["worst_acc/linf/0.05"] == s["robust_acc/pgd_ce/0.05"]  # one attack there
    worst = report.results["worst_acc/linf/0.1"]
    assert worst.attack == "pgd_ce+pgd_cw" and worst.images == len(data.test)
    r = report.results["robust_acc/pgd_cw/0.1"]
    assert (r.objective, r.norm, r.eps, r.steps, r.seeds) == ("cw_margin", "linf", 0.1, 5, 1)
    assert 0 <= s["calibration/ece"] <= 1 and s["calibration/nll"] > 0

    metrics = report.to_json()
    assert metrics["schema"] == 2 and scalars_of(metrics) == s
    assert set(s) <= set(flat_metrics(metrics))  # every result reaches MLflow
    assert metrics["robust_acc"]["pgd_ce"]["0.1"] == s["robust_acc/pgd_ce/0.1"]  # the details stay where they were


def test_any_accuracy_of_the_report_is_a_sweep_objective_checked_before_trials():
    cfg = make_cfg(eval={"attacks": ATTACKS, "autoattack": {"eps": [0.03]}})
    for name in ("worst_acc/linf/0.1", "autoattack_acc/0.03", "robust_acc/pgd_cw/0.1", "worst_acc/linf/0.03"):
        check_objective(Objective(**_parts(name)), cfg)
    with pytest.raises(ConfigError, match=r"'worst_acc/linf/0.2' is not a result of this run config: it needs an "
                                          r"attack at that norm and eps .*worst_acc/linf/0.1"):
        check_objective(Objective(metric="worst_acc", eps=0.2), cfg)
    with pytest.raises(ValueError, match="not an accuracy to maximise"):
        Objective(metric="calibration/ece")


def _parts(name):
    from raysweep.sweeps.objectives import objective_from_name

    return objective_from_name(name)


def test_metrics_json_of_schema_one_still_loads_and_a_newer_one_is_named():
    old = {"clean_acc": 0.9, "robust_acc": {"pgd": {"0.1": 0.5}}, "uap_acc": {"0.1": 0.7}, "mean_uap_acc": 0.7,
           "weighted_acc": 0.8, "auc": {"attack": "pgd", "eps_target": 0.1, "value": 0.6},
           "diversity": {"output_ambiguity": 0.1, "samples": 500}}
    assert scalars_of(old) == {"clean_acc": 0.9, "mean_uap_acc": 0.7, "weighted_acc": 0.8,
                               "robust_acc/pgd/0.1": 0.5, "uap_acc/0.1": 0.7, "auc": 0.6,
                               "diversity/output_ambiguity": 0.1}
    with pytest.raises(UserError, match="metrics.json has schema 3; this raysweep reads schemas 1 and 2"):
        scalars_of({"schema": 3, "results": {}})


def test_ece_is_zero_when_confidence_matches_accuracy_and_counts_the_gap():
    from raysweep.evaluation.calibration import expected_calibration_error

    conf = torch.tensor([0.75] * 4 + [0.25] * 4)
    correct = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool)
    assert expected_calibration_error(conf, correct, 10) == pytest.approx(0.0)
    assert expected_calibration_error(torch.full((4,), 0.9), torch.tensor([1, 0, 0, 0]).bool(), 10) == \
        pytest.approx(0.65)


class _Quantised(torch.nn.Module):
    """A member behind input quantisation: its input gradient is zero everywhere (masked)."""

    def __init__(self, member):
        super().__init__()
        self.member = member

    def forward(self, x, part="logits"):
        return self.member((x * 4).round() / 4, part)


def test_masking_checks_flag_a_gradient_masked_ensemble_and_not_a_plain_one(trained_synthetic, tmp_path):
    from raysweep.core.ensemble import Ensemble
    from raysweep.evaluation.masking import curve_flags

    _, data, ensemble = trained_synthetic
    cfg = make_cfg(ensemble={"k": 3}, data={"train_size": 768, "test_size": 200},
                   eval={"attacks": [{"name": "pgd", "eps": [0.05, 0.1], "steps": 5}], "masking_checks": {},
                         "uap": None, "jacobian_samples": 0, "diversity_samples": 0})
    plain = evaluate(ensemble, data, cfg, progress=False)
    assert plain.masking == {}
    masked = Ensemble([_Quantised(m) for m in ensemble.members], ensemble.weights)
    report = evaluate(masked, data, cfg, progress=False)
    assert {"vanishing_gradients", "above_chance_at_large_eps"} <= set(report.masking)
    metrics = report.to_json()
    assert set(metrics["masking_flags"]) == set(report.masking)

    # Curves: accuracy rising with eps beyond noise, and step doubling stopped while still falling.
    details = {"robust_acc": {"a": {"0.1": 0.30, "0.2": 0.45}, "b": {"0.1": 0.30, "0.2": 0.31}},
               "attacks": {"a": {"per_eps": {"0.1": {"converged": False, "history": [[10, 0.4], [20, 0.3]]}}}}}
    assert set(curve_flags(details, 500)) == {"rises_with_eps:a", "not_converged:a/0.1"}


def test_masking_flags_become_mlflow_tags(tmp_path, mlflow_store):
    from mlflow import MlflowClient

    from raysweep.tracking.runs import experiment_id, log_results

    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    metrics = {"schema": 2, "clean_acc": 0.9, "results": {"clean_acc": {"value": 0.9}}, "masking_checks": {},
               "masking_flags": {"vanishing_gradients": "90% of 200 images"}, "member_clean_acc": [0.9, 0.2, 0.5]}
    flagged = client.create_run(experiment_id("t", uri)).info.run_id
    log_results(client, flagged, tmp_path, metrics)
    clean = client.create_run(experiment_id("t", uri)).info.run_id
    log_results(client, clean, tmp_path, {**metrics, "masking_flags": {}, "member_clean_acc": [0.9, 0.46, 0.5]})
    tags = client.get_run(flagged).data.tags
    assert tags["raysweep.masking"] == "vanishing_gradients"
    assert tags["raysweep.masking.vanishing_gradients"] == "90% of 200 images"
    assert tags["raysweep.weak_members"] == "2"  # 0.2 is under half of 0.9; 0.5 is not
    assert client.get_run(clean).data.tags["raysweep.masking"] == "none"
    assert "raysweep.weak_members" not in client.get_run(clean).data.tags


def test_a_member_that_learned_nothing_is_named(trained_synthetic, tmp_path):
    """Member 2's head silenced (constant logits): the ensemble stays accurate through the other two, and
    the evaluation's summary names member 2 as weak; the trained ensemble has no weak member."""
    import copy

    from raysweep.cli import _summary
    from raysweep.core.ensemble import Ensemble
    from raysweep.evaluation.report import weak_members

    _, data, ensemble = trained_synthetic
    cfg = make_cfg(ensemble={"k": 3}, data={"train_size": 768, "test_size": 200},
                   eval={"uap": None, "jacobian_samples": 0, "diversity_samples": 0})
    assert weak_members(evaluate(ensemble, data, cfg, progress=False).to_json()) == []
    members = [copy.deepcopy(m) for m in ensemble.members]
    with torch.no_grad():
        members[1].head.weight.zero_()
        members[1].head.bias.zero_()
    metrics = evaluate(Ensemble(members, ensemble.weights), data, cfg, progress=False).to_json()
    assert metrics["clean_acc"] > 0.8 and weak_members(metrics) == [2]
    assert "WEAK MEMBERS 2 of 3: clean accuracy " in _summary(metrics, tmp_path)


def _evaluate_until(ckpt, out, keep, pattern: str, poll: float = 0.02, first: str = "") -> Path:
    """evaluate_checkpoint in its own process with resume_dir `keep` (after the statements `first`),
    SIGKILLed as soon as a file matching `pattern` (under keep) appears; returns the kept folder."""
    import signal
    import subprocess
    import sys
    import time

    code = (f"import sys; {first}\nfrom raysweep.run import evaluate_checkpoint; "
            "evaluate_checkpoint(sys.argv[1], None, sys.argv[2], progress=False, resume_dir=sys.argv[3])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ckpt), str(out), str(keep)])
    try:
        deadline = time.monotonic() + 240
        while not list(keep.glob(pattern)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(poll)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    (folder,) = keep.iterdir()
    return folder


def test_an_evaluation_killed_mid_uap_continues_from_its_finished_stages(trained_synthetic, tmp_path):
    """A fair study's evaluation takes an hour per variant. Killed (SIGKILL, in its own process) after the
    attacks stage and the first UAP eps, evaluation started again with the same resume_dir runs neither
    again and ends with exactly the uninterrupted evaluation's results. Another config over the same
    folder reuses nothing and removes what the first one kept."""
    import json

    from raysweep.core.checkpoint import save_checkpoint
    from raysweep.reproduce.study import kept_progress
    from raysweep.run import evaluate_checkpoint

    cfg0, data, ensemble = trained_synthetic
    uap = {"eps": [0.1, 0.2, 0.3], "seeds": 2, "iterations": 60, "batch_size": 32, "selection_size": 200}
    cfg = make_cfg(**{**cfg0.model_dump(), "eval": {"attacks": ATTACKS[:1], "uap": uap, "jacobian_samples": 0,
                                                    "diversity_samples": 0}})
    ckpt = save_checkpoint(tmp_path / "ckpt", ensemble, cfg, data.image_shape, data.num_classes, data.mean, data.std)
    whole = evaluate_checkpoint(ckpt, None, tmp_path / "whole", progress=False)

    keep = tmp_path / ".partial" / "checks" / "x" / "eval"  # where a study's check keeps its evaluation
    folder = _evaluate_until(ckpt, tmp_path / "cut", keep, "*/uap/eps_*[0-9].pt")  # a finished eps
    assert (folder / "attacks.pt").is_file() and not (folder / "uap.pt").exists(), "the kill did not land mid-UAP"
    kept_eps = {p.name for p in (folder / "uap").glob("eps_*[0-9].pt")}
    assert 1 <= len(kept_eps) < 3
    n = len(kept_eps)
    said = kept_progress(tmp_path, "checks/x", cfg, ckpt)  # what reproduce --dry-run prints
    assert said.startswith(f"evaluation kept: attacks, uap ({n} part{'s' * (n > 1)}"), said
    kept_seconds = sum(torch.load(folder / "uap" / name, weights_only=True)["seconds"] for name in kept_eps)

    resumed = evaluate_checkpoint(ckpt, None, tmp_path / "resumed", progress=False, resume_dir=keep)
    assert resumed["eval_resumed"] == ["attacks"]
    assert {f"eps_{e}.pt" for e in resumed["uap_protocol"]["resumed_eps"]} == kept_eps
    assert resumed["results"] == whole["results"]
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["uap_acc"] == whole["uap_acc"]
    assert resumed["eval_stage_seconds"]["attacks"] == torch.load(folder / "attacks.pt", weights_only=True)["seconds"]
    # The UAP stage's time counts the eps the killed process finished: the compute the evaluation took in all.
    every_eps = sum(torch.load(p, weights_only=True)["seconds"] for p in (folder / "uap").glob("eps_*[0-9].pt"))
    assert kept_seconds > 0 and resumed["eval_stage_seconds"]["uap"] >= every_eps

    other = make_cfg(**{**cfg.model_dump(), "eval": {**cfg.eval.model_dump(), "uap": {**uap, "seeds": 1}}})
    ckpt2 = save_checkpoint(tmp_path / "ckpt2", ensemble, other, data.image_shape, data.num_classes, data.mean,
                            data.std)
    fresh = evaluate_checkpoint(ckpt2, None, tmp_path / "fresh", progress=False, resume_dir=keep)
    assert "eval_resumed" not in fresh and "resumed_eps" not in fresh["uap_protocol"]
    assert not folder.exists() and len(list(keep.iterdir())) == 1


def test_an_evaluation_killed_mid_ladder_continues_from_its_finished_attack_runs(trained_synthetic, tmp_path):
    """A step-doubling PGD ladder on a 9-member ensemble at 10 000 images runs for hours here. Killed
    (SIGKILL, in its own process) after some of its runs, evaluation started again with the same resume_dir
    runs only the ones that were not finished and ends with exactly the uninterrupted evaluation's results."""
    from raysweep.core.checkpoint import save_checkpoint
    from raysweep.run import evaluate_checkpoint

    cfg0, data, ensemble = trained_synthetic
    # the first run is 2 steps and the rest of the ladder up to 128: the kill lands long before its end
    ladder = [{"name": "pgd_ladder", "eps": [0.05, 0.2], "steps": 2, "double_steps": True, "max_steps": 128}]
    cfg = make_cfg(**{**cfg0.model_dump(), "eval": {"attacks": ladder, "jacobian_samples": 0,
                                                    "diversity_samples": 0}})
    ckpt = save_checkpoint(tmp_path / "ckpt", ensemble, cfg, data.image_shape, data.num_classes, data.mean, data.std)
    whole = evaluate_checkpoint(ckpt, None, tmp_path / "whole", progress=False)
    rungs = sum(len(r["history"]) for r in whole["attacks"]["pgd_ladder"]["per_eps"].values())
    assert rungs >= 4  # a ladder to cut: at least one eps doubled its steps

    keep = tmp_path / "keep"
    folder = _evaluate_until(ckpt, tmp_path / "cut", keep, "*/attacks/0_*.pt", poll=0.01)
    assert not (folder / "attacks.pt").exists(), "the kill did not land mid-ladder"
    kept = {p.stem: torch.load(p, weights_only=True) for p in (folder / "attacks").glob("0_*.pt")}
    kept_rungs = sum(len(p["history"]) for p in kept.values())
    assert 1 <= kept_rungs < rungs

    lines = []
    resumed = evaluate_checkpoint(ckpt, None, tmp_path / "resumed", progress=False, resume_dir=keep, log=lines.append)
    assert resumed["results"] == whole["results"]
    per_eps = resumed["attacks"]["pgd_ladder"]["per_eps"]
    assert {e: r["history"] for e, r in per_eps.items()} == \
        {e: r["history"] for e, r in whole["attacks"]["pgd_ladder"]["per_eps"].items()}
    assert {f"0_{e}": r["resumed_rungs"] for e, r in per_eps.items() if "resumed_rungs" in r} == \
        {name: len(p["history"]) for name, p in kept.items()}
    ran = [line for line in lines if line.startswith("evaluation: pgd_ladder eps")]
    assert len(ran) == rungs - kept_rungs  # the finished runs were not run again
    assert all(p["seconds"] > 0 for p in kept.values())  # the killed process's time counts in the stage's


def test_an_evaluation_folder_kept_under_an_earlier_schema_is_taken_over(trained_synthetic, tmp_path):
    """A field added to the schema since an evaluation was cut off (with its default) changes the run
    identity's text, so its digest, but not what the evaluation computes: the folder it kept (hours of a
    fair study's UAP) is taken over, not removed. A folder kept for another config is still removed."""
    from raysweep.config import current_identity, run_identity
    from raysweep.evaluation import resume

    cfg, _, ensemble = trained_synthetic
    text = run_identity(cfg)
    older = "\n".join(line for line in text.splitlines() if "weighted_acc_w" not in line)  # before that field
    assert older != text and resume.digest(ensemble, older) != resume.digest(ensemble, text)
    root = tmp_path / "keep"
    for name, identity in (("earlier", older), ("other", run_identity(make_cfg(**{**cfg.model_dump(), "seed": 1})))):
        (root / name).mkdir(parents=True)
        (root / name / resume.IDENTITY_FILE).write_text(identity)
        (root / name / "attacks.pt").write_text(name)

    assert resume.find(root, ensemble, text) is None  # without `current`, names alone: nothing matches
    assert resume.find(root, ensemble, text, current_identity) == root / "earlier"  # what --dry-run reads
    folder = resume.folder_for(root, ensemble, text, current_identity)
    assert folder.name == resume.digest(ensemble, text) and (folder / "attacks.pt").read_text() == "earlier"
    assert [p.name for p in root.iterdir()] == [folder.name]  # the other config's folder is gone
    assert (folder / resume.IDENTITY_FILE).read_text() == text  # found by name from now on


def test_an_evaluation_interrupted_among_its_member_attacks_keeps_the_members_it_attacked(trained_synthetic, tmp_path):
    """eval.attack_members attacks each member alone, K attacks of the whole test set per attack and eps.
    Interrupted after the first member at the first eps, evaluation started again with the same
    resume_dir attacks only the other members there and at the next eps, and reports exactly what the
    uninterrupted one does."""
    from raysweep.core.checkpoint import save_checkpoint
    from raysweep.run import evaluate_checkpoint

    cfg0, data, ensemble = trained_synthetic
    attacks = [{"name": "pgd", "eps": [0.05, 0.1], "steps": 3}]
    cfg = make_cfg(**{**cfg0.model_dump(), "eval": {"attacks": attacks, "attack_members": True,
                                                    "jacobian_samples": 0, "diversity_samples": 0}})
    ckpt = save_checkpoint(tmp_path / "ckpt", ensemble, cfg, data.image_shape, data.num_classes, data.mean, data.std)
    whole = evaluate_checkpoint(ckpt, None, tmp_path / "whole", progress=False)

    def stop_after_a_member(line):
        if " members eps " in line:
            raise KeyboardInterrupt  # as a Ctrl-C landing right after the first member's attack
    keep = tmp_path / "keep"
    with pytest.raises(KeyboardInterrupt):
        evaluate_checkpoint(ckpt, None, tmp_path / "cut", progress=False, resume_dir=keep, log=stop_after_a_member)

    lines = []
    resumed = evaluate_checkpoint(ckpt, None, tmp_path / "resumed", progress=False, resume_dir=keep, log=lines.append)
    k = ensemble.k
    attacked = [line.split(" attacked")[0] for line in lines if " members eps " in line]
    assert attacked == [f"evaluation: pgd members eps {e}: member {m}/{k}"
                        for e, first in ((0.05, 2), (0.1, 1)) for m in range(first, k + 1)]
    assert resumed["attacks"]["pgd"]["member_robust_acc"] == whole["attacks"]["pgd"]["member_robust_acc"]
    assert resumed["results"] == whole["results"]


def test_an_evaluation_killed_within_a_uap_eps_continues_from_its_last_saved_iteration(trained_synthetic, tmp_path):
    """One eps of the paper's UAP protocol on a 9-member ensemble runs for over an hour here. Killed
    within an eps, evaluation started again continues that eps from its last saved iteration (deltas,
    crafting order, generator, and with the Adam step rule its moments) and crafts exactly the UAP the
    uninterrupted evaluation crafts."""
    from safetensors.torch import load_file

    from raysweep.core.checkpoint import save_checkpoint
    from raysweep.run import evaluate_checkpoint

    cfg0, data, ensemble = trained_synthetic
    uap = {"eps": [0.1], "seeds": 3, "iterations": 150, "batch_size": 32, "selection_size": 200,
           "step_rule": "adam"}  # the most state to carry over
    cfg = make_cfg(**{**cfg0.model_dump(), "eval": {"uap": uap, "jacobian_samples": 0, "diversity_samples": 0}})
    ckpt = save_checkpoint(tmp_path / "ckpt", ensemble, cfg, data.image_shape, data.num_classes, data.mean, data.std)
    whole = evaluate_checkpoint(ckpt, None, tmp_path / "whole", progress=False)

    keep = tmp_path / "keep"
    folder = _evaluate_until(ckpt, tmp_path / "cut", keep, "*/uap/eps_0.1.running.pt", poll=0.01,
                             first="import raysweep.evaluation.uap as u; u.SAVE_EVERY_S = 0")
    assert not list((folder / "uap").glob("eps_0.1.pt")), "the kill did not land within the first eps"
    state = torch.load(folder / "uap" / "eps_0.1.running.pt", weights_only=True)
    assert 0 < state["iteration"] < 150

    resumed = evaluate_checkpoint(ckpt, None, tmp_path / "resumed", progress=False, resume_dir=keep)
    went_on = resumed["uap_protocol"]["continued_eps"]["0.1"]
    assert went_on >= state["iteration"]  # the file may have been saved again before the kill landed
    assert resumed["results"] == whole["results"]
    got, want = (load_file(tmp_path / run / "uap.safetensors") for run in ("resumed", "whole"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert not list((folder / "uap").glob("*.running.pt"))  # each finished eps removes its running state
