"""Sweeps: the Ray Tune + Optuna driver (tune.py), what runs in each trial (trial.py) and what it
reports per epoch (epochs.py), the sweep directory and its reconciliation with MLflow (ledger.py), the
search space (space.py), objectives (objectives.py) and the summary (summary.py)."""
