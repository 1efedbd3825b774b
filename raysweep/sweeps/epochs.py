"""What a trial reports to Tune as each epoch ends. On its own, importing nothing: with the Ray executor
this function is unpickled in Ray Train's controller and in every worker (it travels in the run's
callbacks), so whatever its module imports each of those processes imports too. From trial.py (MLflow,
Ray Tune, the evaluation stack) that was several CPU-seconds per process per trial."""
from __future__ import annotations

import functools


def epoch_metrics(row: dict, epochs: int, run_id: str) -> dict | None:
    """What a trial reports to Tune as an epoch ends: ASHA's metric (the objectives exist only after
    evaluation) and the row for MLflow, which the driver logs live. The last epoch is reported with the
    objectives instead: ASHA stops a trial reaching max_t, which would cut its evaluation off."""
    n = row["epoch"] + 1  # history rows count epochs from 0; Tune's `epoch` from 1 (ASHA's time attribute)
    if n >= epochs:
        return None
    return {"epoch": n, "train_acc": row["train_acc"], "train_loss": row["loss"], "mlflow_run_id": run_id,
            **({"probe_acc": row["probe_acc"]} if "probe_acc" in row else {}),
            **{f"train/{k}": float(v) for k, v in row.items() if k != "epoch"}}


def relay(epochs: int, run_id: str):
    """epoch_metrics of one run, as the Ray executor carries it to Ray Train's controller and workers."""
    return functools.partial(epoch_metrics, epochs=epochs, run_id=run_id)
