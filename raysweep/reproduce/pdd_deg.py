"""PDD + DEG: do priority diversified dropout and dispersed ensemble gradients make a
K = 3 ensemble more robust and more diverse than its baseline and ADP, and at what cost per epoch?"""
from __future__ import annotations

import math
from pathlib import Path
from statistics import mean

from raysweep.evaluation.report import masking_flags_of, weak_members
from raysweep.plots import plt, save  # plots selects the Agg backend
from raysweep.reproduce.common import run_variants_then_checks, seed_results, variant_results
from raysweep.reproduce.stats import PAIRED_TEST, compare, estimate, paired
from raysweep.reproduce.study import load_study
from raysweep.reproduce.tables import claims_table, failed_cell, md_table, seed_table, worst_case

# The study's PDD variants come in choices, each a suffix of pdd / pdd_deg: kept units not rescaled (no
# suffix), rescaled by 1/p, or not rescaled with each image's own statistics (the authors' public code)
CHOICES = ("", "_rescaled", "_sample")


def run(path, out, *, uri, experiment, address, log):
    # A study with checks (the fair protocol) re-evaluates every variant under them.
    return run_variants_then_checks(path, out, lambda s, r: [v.name for v in s.variants], uri=uri,
                                    experiment=experiment, address=address, log=log)


def _epoch_seconds(m):
    """Mean epoch time after the first (which pays start-up)."""
    h = m["train"]["history"]
    rows = h[1:] or h
    return sum(r["seconds"] for r in rows) / len(rows)


def _loss_course(m) -> str:
    """The training loss's lowest value (its epoch, from 1) and its last: in the fair study PDD's rose
    again after epoch 7-13, which a final number alone would hide."""
    h = m["train"]["history"]
    low = min(h, key=lambda r: r["loss"])
    return f"{low['loss']:.3f} ({low['epoch'] + 1}) / {h[-1]['loss']:.3f}"


def report(path, results, docs: Path) -> str:
    study = load_study(path)
    vr = variant_results(study, results)
    ev = study.variants[0].cfg.eval
    eps_list = ev.attacks[0].eps
    ok = [v for v in study.variants if "error" not in vr[v.name]]
    failed = [[v.group, failed_cell(vr[v.name])] for v in study.variants if "error" in vr[v.name]]

    headers = ["method", "clean"] + [f"{a.name} {e:g}" for e in eps_list for a in ev.attacks] + [
        f"AutoAttack {e:g}" for e in eps_list] + [f"worst {e:g} (attack)" for e in eps_list]
    rows = []
    for v in ok:
        m = vr[v.name]
        aa = m.get("autoattack", {}).get("per_eps", {})
        worst = [worst_case(m, e) for e in eps_list]
        rows.append([v.group, m["clean_acc"]] + [m["robust_acc"][a.name][str(e)] for e in eps_list for a in ev.attacks]
                    + [aa.get(str(e), {}).get("acc") for e in eps_list] + [f"{w:.3f} ({n})" for w, n in worst])
    lines = ["### White-box attacks (l_inf)", "", md_table(headers, rows + [r + [None] * (len(headers) - 2)
                                                                              for r in failed]), ""]

    t_headers = ["method", "JSMA acc", "JSMA mean L0 fraction", "C&W L2 acc", "C&W mean L2 of successes"] + [
        f"transfer {t.name} (type {t.type}) {e:g}" for t in ev.transfer for e in t.attack.eps]
    t_rows = []
    for v in ok:
        m = vr[v.name]
        j, c, tr = m.get("jsma", {}), m.get("cw_l2", {}), m.get("transfer", {})
        t_rows.append([v.group, j.get("acc"), j.get("mean_l0_fraction"), c.get("acc"), c.get("mean_l2_of_successes")]
                      + [tr.get(t.name, {}).get("per_eps", {}).get(str(e), {}).get("target_acc")
                         for t in ev.transfer for e in t.attack.eps])
    lines += ["### JSMA, C&W and black-box transfer", "", md_table(t_headers, t_rows), ""]

    base = vr.get("baseline", {})
    base_epoch = _epoch_seconds(base) if "error" not in base else None
    d_rows = []
    for v in ok:
        m = vr[v.name]
        d = m.get("diversity", {})
        e = _epoch_seconds(m)
        d_rows.append([v.group, d.get("output_ambiguity"), d.get("discrimination_score"),
                       d.get("mean_gradient_angle_deg"), _loss_course(m), e, e / base_epoch if base_epoch else None])
    lines += ["### Diversity and cost", "",
              md_table(["method", "output ambiguity", "discrimination score", "gradient angle (deg)",
                        "training loss: lowest (epoch) / last", "epoch s", "epoch time / baseline"], d_rows), "",
              "The training loss is the one the members were trained on, PDD's dropout on.", "",
              "Epoch times come from runs that shared the machine's cores with other runs (a study runs its "
              "variants as concurrent Ray tasks), so their ratios are rough; "
              "`benchmarks/bench_methods.py` measures the step-time ratios side by side on an idle machine.", ""]
    if study.seeds:
        lines += _over_seeds(study, results, eps_list[0])
    checks = strong_checks(study, vr, results)
    lines += _checks(study, vr, checks, eps_list)
    # Over seeds where the study has them (one run each without): means with 95% intervals, so a reader sees the noise
    runs = seed_results(study, results)
    _plot([v for v in study.variants if runs[v.name]], runs, eps_list, docs / "robustness.png", checks)
    lines += ["![robust accuracy per method](robustness.png)", ""]
    return "\n".join(lines)


def _over_seeds(study, results, eps: float) -> list[str]:
    """Means and intervals over seeds; which PDD choice (kept units rescaled or not, statistics per batch or
    per image) keeps the baseline's clean accuracy, as the paper's PDD does; the paper's findings decided for
    every choice, that one first."""
    metrics = {"clean": lambda m: m["clean_acc"],
               f"PGD-10 {eps:g}": lambda m: m["robust_acc"]["pgd10"][str(eps)],
               f"worst {eps:g}": lambda m: worst_case(m, eps)[0],
               "weakest member, clean": lambda m: min(m.get("member_clean_acc") or [math.nan]),
               "discrimination score": lambda m: m["diversity"]["discrimination_score"]}
    lines = [f"### Over seeds {study.seeds}: mean ± 95% interval", "", seed_table(study, results, metrics), ""]
    per_seed, names = seed_results(study, results), {v.name for v in study.variants}
    clean = {n: [m["clean_acc"] for m in per_seed[n]] for n in names}
    # A member far below its ensemble learned little; the ensemble's accuracy is then mostly another member's.
    weak = sorted(n for n in names if any(weak_members(m) for m in per_seed[n]))
    if weak:
        lines += [f"Ensembles with a member that learned little (its clean accuracy under half the ensemble's, at "
                  f"some seed): {', '.join(weak)}. Their accuracy is mostly their other members', and their "
                  "discrimination score is left undecided (a silenced member's activated values have no variance).",
                  ""]
    # Each choice (kept units, statistics): its PDD+DEG variant and its PDD-alone one; a choice counts once
    # either has runs
    alone = {f"pdd_deg{c}": f"pdd{c}" for c in CHOICES}
    has = lambda n: n in names and bool(clean[n])  # noqa: E731
    pdd = [n for n in alone if has(n) or has(alone[n])]
    if not clean.get("baseline"):
        return lines
    # The paper's PDD+DEG is as accurate as its baseline, with every member working: the choice without weak
    # members whose mean clean accuracy (PDD+DEG's, else PDD alone's) is nearest the baseline's comes first.
    # The findings are decided for the other choice too, so that no choice is hidden.
    nearness = lambda n: abs(mean(clean[n] if has(n) else clean[alone[n]]) - mean(clean["baseline"]))  # noqa: E731
    choices = sorted(pdd, key=lambda n: (n in weak or alone[n] in weak, nearness(n)))
    if choices:
        lines += ["PDD's choices (kept units rescaled by 1/p or not; statistics of the mini-batch or of each image): "
                  "clean accuracy against the baseline's (A - B, Welch's 95% interval):", ""]
        for n in [m for n in choices for m in (alone[n], n) if has(m)]:
            c = compare(clean[n], clean["baseline"])
            interval = "(one seed)" if math.isnan(c.low) else f"[{c.low:+.3f}, {c.high:+.3f}]"
            lines.append(f"- {n}: {c.diff:+.3f} {interval}")
        missing = [n for n in alone if n not in choices and n in names]
        lines += ["", (f"{choices[0]} comes first: of the choices without weak members, its clean accuracy is nearest "
                       "the baseline's, as the paper's PDD+DEG is; the findings below are decided for each choice."
                       if len(choices) > 1 else f"Only {choices[0]}'s choice has runs so far"
                       + (f" ({', '.join(missing)} has none)." if missing else ".")), ""]
    pgd = f"PGD-10 {eps:g}"
    claims = []
    for n in choices:
        units = _choice(study.variant(n).cfg.train.pdd)
        claims += [(f"PDD+DEG ({units}) more robust than the baseline (PGD-10, eps {eps:g})", n, "baseline", pgd, 1),
                   (f"PDD+DEG ({units}) more robust than ADP (PGD-10, eps {eps:g})", n, "adp", pgd, 1),
                   (f"PDD+DEG ({units}) more robust than the baseline, worst case over the attacks at {eps:g}", n,
                    "baseline", f"worst {eps:g}", 1),
                   (f"PDD alone ({units}) more robust than the baseline (PGD-10, eps {eps:g})", alone[n], "baseline",
                    pgd, 1)]
        # A silenced member has no variance of activated values: the score's mean is then unbounded, not a finding
        if n not in weak:
            claims.append((f"PDD+DEG ({units}) members more diverse than the baseline's", n, "baseline",
                           "discrimination score", 1))
    claims.append((f"DEG alone more robust than the baseline (PGD-10, eps {eps:g})", "deg", "baseline", pgd, 1))
    table = claims_table(study, results, claims, metrics)
    return lines + (["### The paper's findings, decided over seeds", "", table, ""] if table else [])


def _choice(pdd) -> str:
    return ("rescaled" if pdd.rescale else "not rescaled") + (", per-image statistics" if pdd.scope == "sample" else "")


# The findings the checks re-decide at the strong protocol: (A, B), A more robust in the paper
CHECKED = [pair for c in CHOICES for pair in ((f"pdd_deg{c}", "baseline"), (f"pdd_deg{c}", "adp"),
                                              (f"pdd{c}", "baseline"))] + [("deg", "baseline")]


def strong_checks(study, vr, results) -> dict[str, dict]:
    """Each variant's check that ran the evaluation protocol (its first seed's models, whose run finished)."""
    return {v.name: c for v in study.variants if "error" not in vr[v.name]
            and "protocol" in (c := results.get(f"checks/{v.name}", {}))}


def _checks(study, vr, checks, eps_list) -> list[str]:
    """The checks: each variant's first-seed models under raysweep's strong protocol beside the paper's PGD-10,
    with the flags its evaluation raised; then the paper's robustness findings re-decided on the same images."""
    if not checks:
        return []
    first = next(iter(checks.values()))["protocol"]
    # checks of one study share their protocol; one run with another (an older evaluation) is left out
    checks = {n: c for n, c in checks.items()
              if (c["protocol"]["images"], c["protocol"]["stages"]) == (first["images"], first["stages"])}
    eps = [e for e in eps_list if all(str(e) in c["protocol"]["per_eps"] for c in checks.values())]
    level, seed = first["level"], f"seed {study.seeds[0]}" if study.seeds else "one seed"
    rows = []
    for n, c in checks.items():
        m = vr[n]
        rows.append([n, study.variant(n).group, m["clean_acc"]]
                    + [x for e in eps for x in (m["robust_acc"]["pgd10"].get(str(e)),
                                                c["protocol"]["per_eps"][str(e)]["acc"])]
                    + ["; ".join(f"{k}: {why}" for k, why in masking_flags_of(c).items()) or "none"])
    lines = [f"### Checks: is it real? {seed.capitalize()} under raysweep's {level} protocol", "",
             f"The {level} protocol ({', '.join(first['stages'])}; an image counts as robust only if every stage "
             f"fails on it) on the first {first['images']} test images, beside PGD-10 on the whole test set. The flags "
             "are those its evaluation raised: the masking checks' (vanished input gradients, accuracy above chance at "
             "a large eps) and the protocol's own (a black-box stage beating the white-box ones, long PGD still "
             "breaking images).", "",
             md_table(["variant", "group", "clean"] + [x for e in eps for x in (f"PGD-10 {e:g}", f"{level} {e:g}")]
                      + ["flags"], rows), ""]
    robust = {n: {e: [b == -1 for b in c["protocol"]["per_eps"][str(e)]["image_broken_by"]] for e in eps}
              for n, c in checks.items()}
    f_rows = []
    for a, b in CHECKED:
        if a in robust and b in robust:
            for e in eps:
                c = paired(robust[a][e], robust[b][e])
                only_a = sum(x and not y for x, y in zip(robust[a][e], robust[b][e]))
                only_b = sum(y and not x for x, y in zip(robust[a][e], robust[b][e]))
                f_rows.append([f"{study.variant(a).group} more robust than {study.variant(b).group}", f"{a} vs {b}",
                               f"{level} {e:g}", f"{only_a} / {only_b}", f"{c.diff:+.3f}",
                               f"[{c.low:+.3f}, {c.high:+.3f}]", c.verdict])
    if f_rows:
        lines += [f"The paper's robustness findings at {seed} under the {level} protocol, on the same images for A "
                  "and B. One training seed: the interval covers which images were drawn, not which seed was trained, "
                  "so these say whether a gain at PGD-10 survives a stronger attack, not whether it holds over seeds. "
                  "The interval is a t-interval of per-image differences: it needs dozens of images on which A and B "
                  f"differ (the counts are shown). Each of the {len(f_rows)} intervals is at 95% on its own, not "
                  "corrected for their number.",
                  "", md_table(["paper's finding", "A vs B", "metric", "images only A / only B survives", "A - B",
                                f"95% interval ({PAIRED_TEST})", "verdict"], f_rows), ""]
    return lines


def _plot(vs, runs, eps_list, path, checks=None):
    """Robustness per variant, and gradient dispersion against it: means over each variant's runs (its seeds)
    with 95% intervals as error bars (none with one run). `checks` {variant: its check's metrics}: the
    protocol's accuracy of its first seed's models, dotted in the variant's colour."""
    def point(values):
        e = estimate(values)
        return e.mean, e.bar

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    n = {len(runs[v.name]) for v in vs}
    for v in vs:
        ms = runs[v.name]
        label = v.group if len(n) == 1 else f"{v.group} ({len(ms)} seed{'s' if len(ms) > 1 else ''})"
        acc = [point([m["clean_acc"] for m in ms])] + [point([worst_case(m, e)[0] for m in ms]) for e in eps_list]
        bars = axes[0].errorbar([0.0] + eps_list, [a for a, _ in acc], yerr=[h for _, h in acc], marker="o",
                                capsize=3, label=label)
        if v.name in (checks or {}):
            strong = checks[v.name]["protocol"]["per_eps"]
            es = [e for e in eps_list if str(e) in strong]
            axes[0].plot(es, [strong[str(e)]["acc"] for e in es], linestyle=":", marker="o", mfc="none",
                         color=bars[0].get_color())
        if all("mean_gradient_angle_deg" in m.get("diversity", {}) for m in ms):
            angle = point([m["diversity"]["mean_gradient_angle_deg"] for m in ms])
            axes[1].errorbar(angle[0], acc[1][0], xerr=angle[1], yerr=acc[1][1], marker="o", capsize=3, label=label)
    over = f"mean ± 95% interval over {n.pop()} seeds" if len(n) == 1 and max(n, default=1) > 1 else \
        "one run each" if n == {1} else "mean ± 95% interval over each variant's seeds"
    # ticks at the evaluated eps: matplotlib's own for [0, 0.02] print five decimals each and run together
    axes[0].set(xlabel="l_inf eps", ylabel="worst-case accuracy over the attacks", title=f"Robustness ({over})",
                xticks=sorted({0.0, *eps_list}), xticklabels=[f"{e:g}" for e in sorted({0.0, *eps_list})])
    axes[1].set(xlabel="mean pairwise gradient angle (deg)", ylabel=f"worst-case accuracy at eps {eps_list[0]:g}",
                title="Gradient dispersion vs robustness")
    if checks:
        protocol = next(iter(checks.values()))["protocol"]
        axes[0].plot([], [], linestyle=":", marker="o", mfc="none", color="grey",
                     label=f"{protocol['level']} protocol, first seed, first {protocol['images']} images")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # none before a study's first run finishes
            ax.legend(fontsize=7)
    save(fig, path)
