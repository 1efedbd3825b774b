"""The Jacobian Ensembles search (Ray Tune + Optuna) against the best point of the hand-made grid of
`raysweep reproduce jacobian-ensembles`: which found the higher weighted accuracy, in how much time."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from raysweep.reproduce.tables import md_table
from raysweep.sweeps.ledger import STATE_FILE
from raysweep.sweeps.tune import run_sweep


def run(path, out, *, uri, experiment, address, log):
    sweep_dir = out / "sweep"
    done = sweep_dir / "summary.json"
    if done.is_file():
        log(f"je-sweep: the sweep in {sweep_dir} has finished (reused)")
        summary = json.loads(done.read_text())
    else:
        summary = run_sweep(str(path), out=str(sweep_dir), tracking=uri, experiment=experiment, address=address,
                            resume=(sweep_dir / STATE_FILE).is_file())
    return {"sweep": summary}


def report(path, results, docs: Path) -> str:
    s = results["sweep"]
    grid_file = docs.parent / "jacobian_ensembles" / "results.json"
    lines = []
    rows = sorted(s["finished_trials"], key=lambda r: -r["weighted_acc"])
    lines += [f"Sweep: {s['finished']} of {s['trials']} trials finished ({s['failed']} failed) in {s['seconds']:.0f} s "
              f"wall on this machine, two trials at a time.", "",
              md_table(["trial", "method", "K", "λ_JR", "clean", "weighted", "trial s"],
                       [[r["trial_id"], r["params"]["ensemble.method"], r["params"]["ensemble.k"],
                         r["params"]["train.jr.lambda_jr"], r["clean_acc"], r["weighted_acc"],
                         round(r["seconds"]) if r["seconds"] else None] for r in rows]), ""]
    if grid_file.is_file():
        grid = {k.removeprefix("variants/"): v for k, v in json.loads(grid_file.read_text()).items()
                if k.startswith("variants/") and "_seed" not in k and "@seed" not in k and "error" not in v}
        name = max(grid, key=lambda n: grid[n]["weighted_acc"])
        g = grid[name]
        grid_seconds = sum(v["total_seconds"] for v in grid.values())
        sweep_seconds = sum(r["seconds"] or 0 for r in rows)
        best = rows[0]
        lines += [md_table(["", "best weighted", "clean", "runs", "run seconds (sum over runs, one core each)"],
                           [["grid (jacobian-ensembles)", g["weighted_acc"], g["clean_acc"], len(grid),
                             round(grid_seconds)],
                            ["Tune + Optuna sweep", best["weighted_acc"], best["clean_acc"], len(rows),
                             round(sweep_seconds)]]), "",
                  f"Grid's best point: `{name}`. Sweep's best trial: {best['params']}.", ""]
    else:
        lines += [f"(no grid results at {grid_file}: run `raysweep reproduce jacobian-ensembles` first)", ""]
    src = Path(s["dir"]) / "tradeoff.png"
    if src.is_file():
        shutil.copy(src, docs / "tradeoff.png")
        lines += ["![sweep trade-off](tradeoff.png)", ""]
    return "\n".join(lines)
