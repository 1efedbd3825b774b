"""Seeds, intervals and verdicts of the reproductions (reproduce/stats.py, study seeds, the claims table)."""
import math

import pytest
import yaml
from scipy import stats as scipy_stats

from raysweep.errors import ConfigError
from raysweep.reproduce import plan
from raysweep.reproduce.jacobian_ensembles import CLAIMS, SEED_METRICS
from raysweep.reproduce.stats import compare, estimate, paired
from raysweep.reproduce.study import load_study
from raysweep.reproduce.tables import claims_table, seed_table


def test_interval_of_a_mean_is_students_t():
    e = estimate([0.61, 0.64, 0.60])
    low, high = scipy_stats.t.interval(0.95, 2, loc=e.mean, scale=scipy_stats.sem([0.61, 0.64, 0.60]))
    assert e.mean == pytest.approx(0.61666667) and e.mean - e.half_width == pytest.approx(low)
    assert e.mean + e.half_width == pytest.approx(high) and e.n == 3
    assert math.isnan(estimate([0.5]).half_width) and str(estimate([0.5])) == "0.500 (1 seed)"


def test_difference_interval_is_welchs():
    a, b = [0.70, 0.72, 0.69], [0.66, 0.69, 0.64]
    c = compare(a, b)
    ci = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (c.low, c.high) == pytest.approx((ci.low, ci.high)) and c.diff == pytest.approx(0.04)


def test_paired_interval_is_the_paired_t_test_over_images():
    a = [True] * 80 + [False] * 20
    b = [True] * 70 + [False] * 10 + [True] * 5 + [False] * 15  # A right where B is wrong on 10, the reverse on 5
    c = paired(a, b)
    ci = scipy_stats.ttest_rel([float(x) for x in a], [float(x) for x in b]).confidence_interval(0.95)
    assert c.diff == pytest.approx(0.05) and (c.low, c.high) == pytest.approx((ci.low, ci.high))
    assert c.verdict == "same direction, not established" and paired(a * 10, b * 10).verdict == "reproduced"
    assert paired(b * 10, a * 10).verdict == "contradicted"


@pytest.mark.parametrize("a, b, sign, verdict", [
    ([0.70, 0.71, 0.72], [0.60, 0.61, 0.62], 1, "reproduced"),
    ([0.70, 0.71, 0.72], [0.60, 0.61, 0.62], -1, "contradicted"),
    ([0.70, 0.60, 0.75], [0.66, 0.64, 0.67], 1, "same direction, not established"),
    ([0.70, 0.60, 0.75], [0.66, 0.64, 0.67], -1, "not reproduced"),
    ([0.70], [0.60], 1, "one seed, no interval: same direction"),
])
def test_verdicts_read_the_interval(a, b, sign, verdict):
    assert compare(a, b, sign).verdict == verdict


def _study(tmp_path, seeds, **variant):
    spec = {"study": "s", "base": {"data": {"dataset": "synthetic"}}, "variants": {"standard": {"group": "standard"},
            "jr_0.05": {"group": "JR only", "set": {"train.jr.lambda_jr": 0.05, **variant}}}}
    if seeds is not None:
        spec["seeds"] = seeds
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_a_study_runs_every_variant_at_each_seed(tmp_path):
    study = load_study(_study(tmp_path, [3, 4, 5]))
    jobs = study.jobs()
    assert [j.key for j in jobs] == ["variants/standard", "variants/standard@seed4", "variants/standard@seed5",
                                     "variants/jr_0.05", "variants/jr_0.05@seed4", "variants/jr_0.05@seed5"]
    assert [j.cfg.seed for j in jobs] == [3, 4, 5, 3, 4, 5]
    assert jobs[4].cfg.train.jr.lambda_jr == 0.05
    assert [j.key for j in load_study(_study(tmp_path, None)).jobs()] == ["variants/standard", "variants/jr_0.05"]
    p = plan("jacobian-ensembles", str(_study(tmp_path, [0, 1])), str(tmp_path / "runs"))
    assert [(r["name"], r["group"], r["done"]) for r in p["variants"]][1] == ("standard@seed1", "standard", False)


@pytest.mark.parametrize("seeds, variant, message", [
    ([0, 0], {}, "distinct integers"),
    ("0,1", {}, "distinct integers"),
    ([0, 1], {"seed": 7}, "sets seed, and the study runs every variant at seeds"),
])
def test_bad_seeds_are_config_errors(tmp_path, seeds, variant, message):
    with pytest.raises(ConfigError, match=message):
        load_study(_study(tmp_path, seeds, **variant))


def test_claims_are_decided_over_seeds(tmp_path):
    study = load_study(_study(tmp_path, [0, 1, 2]))

    def run(clean, uap):
        return {"clean_acc": clean, "mean_uap_acc": uap, "weighted_acc": (clean + uap) / 2}
    results = {"variants/standard": run(0.80, 0.50), "variants/standard@seed1": run(0.81, 0.52),
               "variants/standard@seed2": run(0.79, 0.51), "variants/jr_0.05": run(0.78, 0.60),
               "variants/jr_0.05@seed1": run(0.77, 0.61), "variants/jr_0.05@seed2": {"error": "died"}}
    table = seed_table(study, results, SEED_METRICS)
    assert "| standard | standard | 3 | 0.800 ± 0.025 |" in table and "| jr_0.05 | JR only | 2 |" in table
    claims = claims_table(study, results, CLAIMS, SEED_METRICS)
    (row,) = [line for line in claims.splitlines() if line.startswith("| JR raises UAP accuracy")]
    assert row.endswith("| reproduced |") and "jr_0.05 vs standard" in row
    assert "bagging" not in claims  # claims naming variants the study lacks are left out


def test_the_fair_study_is_shipped_and_valid():
    study = load_study(plan("jacobian-ensembles", "search_spaces/reproduce/jacobian_ensembles_fair.yaml")["file"])
    assert study.seeds == [0, 1, 2] and len(study.jobs()) == 12
    cfg = study.variant("je_bagging_k9_0.05").cfg
    assert cfg.data.train_size is None and cfg.data.test_size is None  # the whole of Fashion-MNIST
    assert (cfg.eval.uap.iterations, cfg.eval.uap.batch_size) == (100, 200)
    names = {v.name for v in study.variants}
    assert sum(a in names and b in names for _, a, b, _, _ in CLAIMS) >= 4


def test_the_fair_pdd_study_decides_both_pdd_choices_and_names_weak_members(tmp_path):
    """Synthetic results for the shipped fair PDD+DEG study. The rescaled choice is nearest the baseline's
    clean accuracy, so its findings come first, until one of its ensembles has a weak member (under half its
    clean accuracy): then the other choice comes first, the weak ensemble is named and its discrimination
    score is not judged. A choice with only PDD-alone runs is still decided; its checks configs are valid."""
    from raysweep.reproduce.pdd_deg import _over_seeds
    from raysweep.reproduce.study import check_job

    study = load_study(plan("pdd-deg", "search_spaces/reproduce/pdd_deg_fair.yaml")["file"])
    assert study.seeds == [0, 1, 2] and len(study.jobs()) == 27
    assert study.variant("pdd_rescaled").cfg.train.pdd.rescale and not study.variant("pdd").cfg.train.pdd.rescale
    check_job(study, "pdd_deg", "pdd_deg", study.spec["checks"], tmp_path)  # validates the checks' config

    def results_of(weak: str = "", drop: tuple = ()):
        def run(name, clean, pgd, seed):
            members = [clean - 0.01, 0.4, clean] if name == weak and seed == 0 else [clean - 0.01 * (1 + seed)] * 3
            return {"clean_acc": clean + seed / 1000, "robust_acc": {"pgd10": {"0.01": pgd + seed / 500}},
                    "fgsm": {}, "diversity": {"discrimination_score": 1.0 + seed}, "member_clean_acc": members}
        table = {"baseline": (0.90, 0.40), "adp": (0.89, 0.42), "pdd": (0.85, 0.50), "pdd_rescaled": (0.90, 0.45),
                 "deg": (0.90, 0.41), "pdd_deg": (0.84, 0.52), "pdd_deg_rescaled": (0.895, 0.47),
                 "pdd_sample": (0.83, 0.49), "pdd_deg_sample": (0.82, 0.50)}  # per image: farthest from 0.90
        return {key: run(v.name, *table[v.name], i) for v in study.variants if v.name not in drop
                for i, (key, _) in enumerate(study.seed_runs(v))}

    def robustness_rows(text):
        return [line.split(" more robust")[0] for line in text.splitlines()
                if "more robust than the baseline (PGD-10" in line]

    text = "\n".join(_over_seeds(study, results_of(), 0.01))
    assert "pdd_deg_rescaled comes first" in text and "learned little" not in text
    assert robustness_rows(text) == ["| PDD+DEG (rescaled)", "| PDD alone (rescaled)", "| PDD+DEG (not rescaled)",
                                     "| PDD alone (not rescaled)", "| PDD+DEG (not rescaled, per-image statistics)",
                                     "| PDD alone (not rescaled, per-image statistics)", "| DEG alone"]
    row = next(line for line in text.splitlines() if line.startswith("| PDD+DEG (rescaled) more robust than the ba"))
    assert "pdd_deg_rescaled vs baseline" in row and row.endswith("| reproduced |")
    # the weakest member's clean accuracy over seeds: 0.89, 0.88, 0.87 for the baseline
    assert "| baseline | baseline | 3 | 0.901 ± 0.002 | 0.402 ± 0.005 | 0.402 ± 0.005 | 0.880 ± 0.025 |" in text
    assert text.count("members more diverse than the baseline's") == 3

    # pdd_deg_rescaled with a member at 0.4 at seed 0: the rescaled choice goes last, its diversity is not judged
    text = "\n".join(_over_seeds(study, results_of(weak="pdd_deg_rescaled"), 0.01))
    assert "(its clean accuracy under half the ensemble's, at some seed): pdd_deg_rescaled." in text
    assert "pdd_deg comes first" in text
    assert robustness_rows(text)[:2] == ["| PDD+DEG (not rescaled)", "| PDD alone (not rescaled)"]
    assert "| PDD+DEG (not rescaled) members more diverse" in text and "(rescaled) members more diverse" not in text
    assert "| pdd_deg_rescaled | PDD+DEG (rescaled) | 3 | 0.896 ± 0.002 | 0.472 ± 0.005 | 0.472 ± 0.005 | " \
        "0.713 ± " in text
    # a weak PDD-alone run ranks its choice last too
    assert "pdd_deg comes first" in "\n".join(_over_seeds(study, results_of(weak="pdd_rescaled"), 0.01))

    # the rescaled PDD+DEG not run yet: its choice is still decided through PDD alone
    text = "\n".join(_over_seeds(study, results_of(drop=("pdd_deg_rescaled",)), 0.01))
    assert "| PDD alone (rescaled)" in robustness_rows(text) and "| PDD+DEG (rescaled)" not in robustness_rows(text)
    # neither variant of the rescaled choice run yet: one choice, said so
    text = "\n".join(_over_seeds(study, results_of(drop=("pdd_deg_rescaled", "pdd_rescaled", "pdd_deg_sample",
                                                           "pdd_sample")), 0.01))
    assert "Only pdd_deg's choice has runs so far (pdd_deg_rescaled, pdd_deg_sample has none)." in text


def test_the_fair_pdd_checks_decide_the_findings_image_by_image():
    """The checks table of the fair PDD report: each checked variant's strong-protocol accuracy beside its
    PGD-10, its masking flags, and the paper's robustness findings re-decided on the same images."""
    from raysweep.reproduce.common import variant_results
    from raysweep.reproduce.pdd_deg import _checks, strong_checks

    study = load_study(plan("pdd-deg", "search_spaces/reproduce/pdd_deg_fair.yaml")["file"])

    def check(robust: int, flags=None):  # 1000 images, the first `robust` ones robust, the rest broken by stage 0
        broken = [-1] * robust + [0] * (1000 - robust)
        return {"protocol": {"level": "strong", "images": 1000, "stages": ["pgd", "apgd-ce"],
                             "per_eps": {"0.01": {"acc": robust / 1000, "image_broken_by": broken}}},
                "masking_flags": flags or {}}
    results = {"variants/baseline": {"clean_acc": 0.92, "robust_acc": {"pgd10": {"0.01": 0.80, "0.02": 0.65}}},
               "variants/pdd": {"clean_acc": 0.89, "robust_acc": {"pgd10": {"0.01": 0.82, "0.02": 0.75}}},
               "checks/baseline": check(774), "checks/pdd": check(813, {"vanishing_gradients": "19% of 200"}),
               "checks/adp": check(777)}  # no finished run of adp: its check is left out
    vr = variant_results(study, results)
    text = "\n".join(_checks(study, vr, strong_checks(study, vr, results), [0.01, 0.02]))
    assert "### Checks: is it real? Seed 0 under raysweep's strong protocol" in text
    assert "| baseline | baseline | 0.920 | 0.800 | 0.774 | none |" in text
    assert "| pdd | PDD | 0.890 | 0.820 | 0.813 | vanishing_gradients: 19% of 200 |" in text
    # PDD survives on every image the baseline does, and on 39 more: a paired interval well above zero
    row = "| PDD more robust than baseline | pdd vs baseline | strong 0.01 | 39 / 0 | +0.039 | [+0.027, +0.051] |"
    assert row + " reproduced |" in text
    assert "pdd_deg vs" not in text and "| adp |" not in text  # no check of pdd_deg; adp's run has not finished
    assert _checks(study, vr, {}, [0.01]) == []


def test_the_fair_ensemble_adv_study_has_every_claimed_variant():
    from raysweep.reproduce.ensemble_adv import CLAIMS as ADV_CLAIMS

    study = load_study(plan("ensemble-adv", "search_spaces/reproduce/ensemble_adv_fair.yaml")["file"])
    names = {v.name for v in study.variants}
    assert study.seeds == [0, 1, 2] and all(a in names and b in names for _, a, b, _, _ in ADV_CLAIMS)
    assert study.variant("ensemble2_adv").cfg.data.train_size is None


def test_the_fair_robust_ensembles_study_has_every_claimed_variant():
    from raysweep.reproduce.robust_ensembles import CLAIMS as ROBUST_CLAIMS

    study = load_study(plan("robust-ensembles", "search_spaces/reproduce/robust_ensembles_fair.yaml")["file"])
    names = {v.name for v in study.variants}
    assert study.seeds == [0, 1, 2] and all(a in names and b in names for _, a, b, _, _ in ROBUST_CLAIMS)
    assert study.variant("alpha_k4").cfg.train.adversarial.eps == 0.05 and study.variant("alpha_k4").cfg.ensemble.k == 4


def test_the_fair_report_of_a_study_half_done(tmp_path):
    """What `--report-only` shows while the fair JE study runs: per-eps UAP accuracy over seeds, the
    variants not finished yet as such, and the findings whose variants have finished."""
    from raysweep.reproduce import jacobian_ensembles

    path = plan("jacobian-ensembles", "search_spaces/reproduce/jacobian_ensembles_fair.yaml")["file"]

    def run(clean, uaps):
        return {"clean_acc": clean, "uap_acc": dict(zip(["0.1", "0.15", "0.2", "0.25"], uaps)),
                "mean_uap_acc": sum(uaps) / 4, "weighted_acc": (clean + sum(uaps) / 4) / 2,
                "train": {"seconds": 100.0}, "eval_seconds": 200.0}
    results = {}
    for s, key in enumerate(["", "@seed1", "@seed2"]):
        results[f"variants/standard{key}"] = run(0.90 + s / 100, [0.55, 0.23, 0.11, 0.10])
        results[f"variants/jr_0.05{key}"] = run(0.86 + s / 100, [0.76, 0.65 + s / 100, 0.54, 0.42])
    report = jacobian_ensembles.report(path, results, tmp_path)
    assert "| variant | group | seeds | clean | UAP 0.1 | UAP 0.15 | UAP 0.2 | UAP 0.25 | mean UAP | weighted |" in report
    assert "| jr_0.05 | JR only | 3 | 0.870 ± 0.025 | 0.760 ± 0.000 | 0.660 ± 0.025 |" in report
    assert "| bagging_k9 | ensemble only | bagging | 9 | 0.000 | not run yet |" in report
    (row,) = [line for line in report.splitlines() if line.startswith("| JR raises UAP accuracy")]
    assert row.endswith("| reproduced |")
    assert "bagging raises" not in report  # its variant has not finished
