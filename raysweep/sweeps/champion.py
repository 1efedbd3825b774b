"""A champion that earns its alias. Before `--register`, the sweep's top candidates by its (cheap)
objective are re-evaluated under a strong protocol (evaluation/protocol.py, with its masking
checks); the one registered is the best by that strong figure among those no masking flag was
raised on (or the best of all, when every one is flagged: it is registered, flagged, and the
`champion` alias does not move to it; tracking/registry.py). The table of candidates, both figures
and the flags, goes into the sweep's summary.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from raysweep.config import validate_config
from raysweep.core.checkpoint import load
from raysweep.core.data import load_dataset
from raysweep.core.sections import Section
from raysweep.evaluation.protocol import ProtocolConfig
from raysweep.evaluation.report import eps_key
from raysweep.run import evaluate


class ChampionConfig(Section):
    """search.champion: how --register picks the version it registers."""
    top: int = Field(3, ge=1, description="candidates re-evaluated: the best N by the sweep's first objective "
                     "(on a Pareto front: its N best by the first objective)")
    protocol: Optional[ProtocolConfig] = Field(
        None, description="null: the strong protocol at the objective's eps (else the largest eps of the run's "
        "attacks) and norm, on 1000 test images")
    level: Literal["quick", "standard", "strong"] = Field("strong", description="when protocol is null")


def champion_protocol(c: ChampionConfig, objective: str, run_cfg) -> ProtocolConfig:
    """The protocol candidates are re-evaluated under."""
    if c.protocol is not None:
        return c.protocol
    parts = objective.split("/")
    norm = next((p for p in parts if p in ("linf", "l2")), None)
    attack = {a.name: a for a in run_cfg.eval.attacks}.get(parts[1] if len(parts) > 2 else "")
    try:
        eps = float(parts[-1])
    except ValueError:
        grid = [e for a in run_cfg.eval.attacks for e in a.eps if e > 0]
        eps = max(grid) if grid else 0.1
    return ProtocolConfig(level=c.level, eps=[eps], norm=norm or (attack.norm if attack else "linf"))


def strong_figures(rows: list[dict], key: str, c: ChampionConfig, trial_config, out: Path, resolve, progress=True):
    """Re-evaluate the top `c.top` rows by `key`; returns them best first by the strong figure,
    unflagged before flagged, each a dict {row, strong_objective, strong_value, masking_flags}."""
    candidates = sorted(rows, key=lambda r: r[key], reverse=True)[:c.top]
    table = []
    for i, row in enumerate(candidates):
        raw = trial_config(row["params"])
        cfg = validate_config(raw)
        protocol = champion_protocol(c, key, cfg)
        # Only the protocol (its masking checks run with it at the strong level); the cheap evaluations
        # were the sweep's.
        cfg = validate_config({**raw, "eval": {"batch_size": cfg.eval.batch_size, "uap": None, "jacobian_samples": 0,
                                               "diversity_samples": 0,
                                               "protocol": protocol.model_dump(mode="json")}})
        if progress:
            print(f"champion: re-evaluating candidate {i + 1}/{len(candidates)} (trial {row['trial_id']}, "
                  f"{key} {row[key]:.4f}) under the {protocol.level} protocol", flush=True)
        report = evaluate(load(resolve(row["checkpoint"])), load_dataset(cfg.data, cfg.seed), cfg, progress=progress)
        name = f"protocol_acc/{protocol.level}/{eps_key(protocol.eps[0])}"
        entry = {"trial_id": row["trial_id"], "mlflow_run_id": row.get("mlflow_run_id"), "objective": key,
                 "objective_value": row[key], "strong_objective": name, "strong_value": report.results[name].value,
                 "masking_flags": sorted(report.masking)}
        table.append((entry, row))
        (out / f"{row['trial_id']}.json").parent.mkdir(parents=True, exist_ok=True)
        (out / f"{row['trial_id']}.json").write_text(json.dumps({**entry, "metrics": report.to_json()}, indent=2))
    table.sort(key=lambda t: (not t[0]["masking_flags"], t[0]["strong_value"]), reverse=True)
    return table
