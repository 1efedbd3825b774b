"""The command line: `raysweep train | sweep | evaluate | reproduce | check-cluster | configs`, `--version`.
A user error prints one message and exits 2, with no traceback."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raysweep.config import dump_config, load_config
from raysweep.errors import UserError
from raysweep.terminal import quiet


def _summary(metrics: dict, out: Path) -> str:
    """Every named result, one line per group: `robust_acc/pgd  0.1: 0.5120  0.2: 0.3010`."""
    from raysweep.evaluation.report import masking_flags_of, scalars_of, weak_members

    groups: dict[str, list[tuple[str, float]]] = {}
    for name, value in scalars_of(metrics).items():
        head, _, last = name.rpartition("/")
        try:
            float(last)  # an eps: one line per curve
        except ValueError:
            head, last = name, ""
        groups.setdefault(head, []).append((last, value))
    lines = [f"{head:<28} " + "  ".join(f"{last}: {v:.4f}" if last else f"{v:.4f}" for last, v in values)
             for head, values in groups.items()]
    ladder = metrics.get("protocol")
    for eps, r in (ladder or {}).get("per_eps", {}).items():  # which stage of the ladder broke the images
        lines.append(f"  {ladder['level']} protocol at {eps}: images broken by " + ", ".join(
            f"{s} {n}" for s, n in r["broken"].items() if n) + f" in {sum(r['seconds'].values()):.0f} s")
    lines += [f"MASKING FLAG {name}: {why}" for name, why in masking_flags_of(metrics).items()]
    if weak := weak_members(metrics):
        accs = ", ".join(f"{metrics['member_clean_acc'][k - 1]:.3f}" for k in weak)
        lines.append(f"WEAK MEMBERS {', '.join(map(str, weak))} of {len(metrics['member_clean_acc'])}: clean accuracy "
                     f"{accs}, under half the ensemble's {metrics['clean_acc']:.3f}; its accuracy is mostly the "
                     "other members'")
    seconds = [f"training {metrics['train']['seconds']:.0f}"] if "train" in metrics else []
    if "eval_seconds" in metrics:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in metrics.get("eval_stage_seconds", {}).items())
        seconds.append(f"evaluation {metrics['eval_seconds']:.0f}" + (f" ({stages})" if stages else ""))
    if seconds:
        lines.append("seconds: " + "; ".join(seconds))
    lines.append(f"wrote {out / 'metrics.json'}" + (f", the checkpoint in {out / 'checkpoint'}"
                                                     if (out / "checkpoint").is_dir() else ""))
    return "\n".join(lines)


def _json(obj) -> None:
    """`--json`: the command's result as one JSON document on stdout (progress and messages go to stderr)."""
    print(json.dumps(obj, indent=1, default=str))


def _cmd_train(args) -> int:
    cfg = load_config(args.config, args.set)
    out = Path(args.out or Path("runs") / cfg.name)
    if args.dry_run:
        if args.json:
            _json({"config": cfg.model_dump(mode="json"), "out": str(out)})
        else:
            print(dump_config(cfg), end="")
            print(f"# dry run: the config above (defaults filled in) is valid; nothing trained. Output would go "
                  f"to {out}")
        return 0
    from raysweep.run import train_recorded

    metrics = train_recorded(cfg, out, mlflow=not args.no_mlflow, tracking=args.tracking_uri,
                             experiment=args.experiment, progress=not args.quiet)
    run_id, uri = metrics.pop("mlflow_run_id", None), metrics.pop("tracking_uri", None)
    if run_id and not args.json:
        print(f"mlflow run     {run_id} ({uri})")
    _report(args, metrics, out, mlflow_run_id=run_id)
    return 0


def _report(args, metrics: dict, out: Path, **extra) -> None:
    """The end of `train` and `evaluate`: the named results, as lines or (--json) one JSON object."""
    if args.json:
        from raysweep.evaluation.report import masking_flags_of, scalars_of

        _json({"metrics": scalars_of(metrics), "masking_flags": masking_flags_of(metrics),
               "metrics_json": str(out / "metrics.json"), **extra})
    else:
        print(_summary(metrics, out))


def _cmd_sweep(args) -> int:
    if args.dry_run:
        return _preview_sweep(args)
    from raysweep.sweeps.tune import run_sweep

    s = run_sweep(args.space, args.set, samples=args.samples, out=args.out, resume=args.resume,
                  register=args.register, tracking=args.tracking_uri, experiment=args.experiment,
                  address=args.address, progress=not args.quiet, storage=args.storage)
    if args.json:
        _json(s)
    else:
        _print_sweep(s)
    if s["status"] == "interrupted":
        print(f"raysweep: sweep interrupted; its unfinished trials' runs are KILLED. Continue it with:\n"
              f"  raysweep sweep --resume --out {s['dir']}", file=sys.stderr)
        return 130
    if s["status"] == "failed":
        print(f"raysweep: error: no trial of the sweep finished ({s['failed']} failed, {s['stopped_early']} stopped "
              f"early, {s['infeasible']} infeasible); their MLflow runs and {s['dir']}/trials/ say why",
              file=sys.stderr)
        return 1
    return 0


def _preview_sweep(args) -> int:
    from raysweep import presets
    from raysweep.sweeps.space import describe, load_search_space

    if args.space is None:
        raise UserError("--dry-run previews a search space file: give one (a resumed sweep has its points already)")
    space = load_search_space(presets.resolve(args.space), args.set)
    n = args.samples if args.samples is not None else space.search.samples
    if n < 1:
        raise UserError(f"--samples {n}: a sweep needs at least 1 trial")
    points = space.preview(n)
    # The Tune trials' packs (search.pack), as the sweep will form them from these first points.
    size = space.search.pack
    tune_trials = [[[start + j for j in group] for group in space.pack_groups([p["params"] for p in
                                                                              points[start:start + size]])]
                   for start in range(0, n, size)]
    if args.json:
        _json({"space": space.source, "name": space.name, "samples": n,
               "objectives": [o.key for o in space.search.objective], "points": points,
               "tune_trials": tune_trials})
        return 0
    print(f"search space {space.source} is valid: {n} trials of {space.name}, maximising "
          f"{', '.join(o.key for o in space.search.objective)}")
    print(f"the seeded sampler's first {n} points, before any result comes back (later points follow the "
          "results):")
    for i, p in enumerate(points):
        print(f"  {i:>3}  {describe(p['params'])}" + ("  INFEASIBLE: " + p["infeasible"].splitlines()[-1].strip()
                                                     if p["infeasible"] else ""))
    if size > 1:
        print(f"packed {size} to a Tune trial (search.pack; pack_training: {space.search.pack_training}):")
        for i, groups in enumerate(tune_trials):
            print(f"  Tune trial {i + 1}: " + "; ".join(
                f"points {', '.join(map(str, g))} trained together" if len(g) > 1 else f"point {g[0]} alone"
                for g in groups))
    print("dry run: nothing trained, nothing recorded")
    return 0


def _print_sweep(s: dict) -> None:
    print(f"trials: {s['finished']} finished, {s['stopped_early']} stopped early, {s['infeasible']} infeasible, "
          f"{s['failed']} failed of {s['samples']}, in {s['seconds']:.0f} s")
    if "pareto" in s:
        print("Pareto set (" + ", ".join(s["objectives"]) + "):")
        for r in s["pareto"]:
            print("  " + "  ".join(f"{k} {r[k]:.4f}" for k in s["objectives"]) + f"  {r['params']}")
    if "best" in s:
        b = s["best"]
        print(("best so far: " if s["status"] == "interrupted" else "best: ")
              + "  ".join(f"{k} {b[k]:.4f}" for k in dict.fromkeys([*s["objectives"], "clean_acc"]))
              + f"  (trial {b['trial_id']}, checkpoint {b['checkpoint']})")
        print(f"best params: {b['params']}")
        if b.get("masking_flags"):
            print(f"MASKING FLAGS on the best trial: {', '.join(b['masking_flags'])} (see its metrics.json)")
        if b.get("weak_members"):
            print(f"WEAK MEMBERS of the best trial: {', '.join(map(str, b['weak_members']))} (clean accuracy under half "
                  "the ensemble's; see member_clean_acc in its metrics.json)")
    for c in s.get("champion_candidates", []):
        print(f"candidate trial {c['trial_id']}: {c['objective']} {c['objective_value']:.4f}, {c['strong_objective']} "
              f"{c['strong_value']:.4f}" + (f", MASKING FLAGS: {', '.join(c['masking_flags'])}" if c['masking_flags']
                                            else ""))
    if "registered" in s:
        r = s["registered"]
        print(f"registered {r['name']} v{r['version']}; champion {'moved' if r['champion'] else 'kept'}: {r['reason']}")
    print(f"wrote {s['dir']}/summary.json" + (" and best.yaml (the best trial's full config)" if "best" in s else ""))


def _cmd_evaluate(args) -> int:
    from raysweep.run import evaluate_saved

    metrics, out = evaluate_saved(args.checkpoint, config=args.config, overrides=args.set, out=args.out,
                                  tracking=args.tracking_uri, progress=not args.quiet)
    _report(args, metrics, out)
    return 0


def _cmd_check_cluster(args) -> int:
    from raysweep import presets
    from raysweep.cluster_check import check_file, cluster_files

    files = [Path(f) for f in args.files] or cluster_files(presets.ROOT / "cluster")
    if not files:
        raise UserError("no cluster files to check")
    for f in files:
        print(f"ok  {check_file(f):<10} {f}")
    return 0


def _cmd_reproduce(args) -> int:
    from raysweep.reproduce import plan, reproduce
    from raysweep.sweeps.space import describe

    if args.dry_run:
        p = plan(args.name, args.study, args.out)
        if args.json:
            _json(p)
            return 0
        print(f"study {p['file']} is valid; runs under {p['out']}")
        for v in p.get("variants", []):
            state = "done (reused)" if v["done"] else f"to finish ({v['kept']})" if v["kept"] else "to train"
            print(f"  {v['name']:<24} {v['group']:<16} {state}")
        for i, pt in enumerate(p.get("points", [])):
            print(f"  sweep point {i}: {describe(pt['params'])}" + (" (infeasible)" if pt["infeasible"] else ""))
        if p.get("checks"):
            print("then the study's checks re-evaluate the best variants under a stronger evaluation")
        for check, kept in p.get("checks_kept", {}).items():
            print(f"  check {check:<18} to finish ({kept})")
        print("dry run: nothing trained, nothing recorded")
        return 0
    reproduce(args.name, out=args.out, docs=args.docs, study_path=args.study, tracking=args.tracking_uri,
              experiment=args.experiment, address=args.address, report_only=args.report_only)
    return 0


def _cmd_configs(args) -> int:
    from raysweep import presets

    if args.name:
        print(f"copied {presets.copy_out(args.name, args.to)}")
        return 0
    shown = [p for p in presets.catalogue() if p.name.endswith((".yaml", ".yml"))]
    for kind in ("run config", "search space", "study", "cluster"):
        print(f"{kind}s:" if kind != "study" else "studies (raysweep reproduce):")
        for p in (p for p in shown if p.kind == kind):
            about = p.about if len(p.about) <= 72 else p.about[:71] + "…"
            print(f"  {p.name:<52} {about}")
    print("Run one as named here from any directory (e.g. raysweep train search_spaces/pdd_deg/adp.yaml), or copy\n"
          "it out to edit: raysweep configs NAME [--to DIR] (a folder too: raysweep configs cluster)")
    return 0


def _script_args(p, dry_run_help: str) -> None:
    p.add_argument("--dry-run", action="store_true", help=dry_run_help)
    p.add_argument("--json", action="store_true", help="print the result (summary, metrics or dry-run plan) as one "
                   "JSON object on stdout")


def _mlflow_args(p) -> None:
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlflow.db in this directory)")
    p.add_argument("--experiment", help="MLflow experiment (default raysweep)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raysweep", description="Train and evaluate adversarially robust ensembles.")
    p.add_argument("--version", action="version", version=_versions())
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="train and evaluate an ensemble from a YAML config")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. train.epochs=2")
    t.add_argument("--out", help="output directory (default runs/<name>)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    _mlflow_args(t)
    t.add_argument("--no-mlflow", action="store_true", help="do not record the run in MLflow")
    _script_args(t, "print the resolved config (defaults filled in) and stop: nothing trained")
    t.set_defaults(func=_cmd_train)
    w = sub.add_parser("sweep", help="search a space with Ray Tune + Optuna, every trial tracked in MLflow")
    w.add_argument("space", nargs="?", help="a search space YAML: a run config plus a search: section (optional "
                   "with --resume --out DIR)")
    w.add_argument("--samples", type=int, help="number of trials (default search.samples)")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the run config or of search:, e.g. search.seed=1")
    w.add_argument("--out", help="sweep directory (default runs/sweeps/<name>)")
    w.add_argument("--storage", help="where trials' checkpoints, metrics, pictures and Tune's state go: a path "
                   "every node sees or a pyarrow URI (s3://, gs://, file://); default the sweep directory")
    w.add_argument("--resume", action="store_true", help="continue the interrupted sweep in the sweep directory, "
                   "exactly as it was started (its space, --set, --samples, storage and MLflow store)")
    w.add_argument("--register", metavar="NAME", help="register the best ensemble in the MLflow model registry")
    w.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    w.add_argument("--quiet", action="store_true")
    _mlflow_args(w)
    _script_args(w, "validate the space and print the first points the seeded sampler draws (each checked as its "
                 "trial would be) and stop: nothing trained or recorded")
    w.set_defaults(func=_cmd_sweep)
    r = sub.add_parser("reproduce", help="reproduce a paper's finding at small scale: runs, checks, report, plots")
    r.add_argument("name", help="jacobian-ensembles, robust-ensembles, ensemble-adv, pdd-deg or je-sweep")
    r.add_argument("--study", help="study file (default search_spaces/reproduce/<name>.yaml)")
    r.add_argument("--out", help="runs directory (default runs/reproduce/<name>); finished runs there are reused")
    r.add_argument("--docs", help="where the report and plots go (default docs/results/<name>)")
    r.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlflow.db here); 'none': no MLflow")
    r.add_argument("--experiment", help="MLflow experiment (default reproduce-<name>)")
    r.add_argument("--dry-run", action="store_true", help="validate the study and list its runs (and which are "
                   "done already) and stop")
    r.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON on stdout")
    r.add_argument("--report-only", action="store_true", help="write the report from the runs finished so far "
                   "(of a study running in the background, or stopped) and train nothing")
    r.set_defaults(func=_cmd_reproduce)
    c = sub.add_parser("check-cluster", help="validate cluster launcher YAMLs and KubeRay manifests offline")
    c.add_argument("files", nargs="*", help="files to check (default: every YAML of the cluster/ that ships with "
                   "raysweep; `raysweep configs cluster` copies it out)")
    c.set_defaults(func=_cmd_check_cluster)
    g = sub.add_parser("configs", help="list the ready configs, search spaces, studies and cluster files that ship "
                       "with raysweep, or copy one out")
    g.add_argument("name", nargs="?", help="a file or folder to copy out, e.g. search_spaces/pdd_deg_sweep.yaml, "
                   "pdd_deg_sweep or cluster")
    g.add_argument("--to", default=".", help="the folder to copy into (default: here)")
    g.set_defaults(func=_cmd_configs)
    e = sub.add_parser("evaluate", help="re-evaluate a saved ensemble")
    e.add_argument("checkpoint", help="a checkpoint directory (or the run directory holding it), a registry "
                   "URI models:/NAME@ALIAS or models:/NAME/VERSION, or an MLflow run's runs:/RUN_ID/checkpoint")
    e.add_argument("--config", help="YAML whose sections (e.g. eval:, data:) replace the stored config's")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--out", help="output directory (default <run>/eval)")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--tracking-uri", help="MLflow store of the registry (default $MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlflow.db here)")
    e.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    e.set_defaults(func=_cmd_evaluate)
    return p


def _versions() -> str:
    """raysweep's version and those of the parts whose behaviour it depends on (read from the installed
    distributions' metadata: nothing heavy is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    from raysweep import __version__

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"raysweep {__version__} (" + ", ".join(f"{n} {v(n)}" for n in ("torch", "ray", "mlflow", "optuna")) + ")"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `raysweep`: the commands and what they do
        parser.print_help()
        return 0
    quiet()  # what other libraries would print that the user cannot act on (raysweep.terminal)
    try:
        return args.func(args)
    except UserError as err:
        print(f"raysweep: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raysweep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
