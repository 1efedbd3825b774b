"""Sweeps: the search space (space.py) and the Ray Tune + Optuna driver (tune.py)."""
