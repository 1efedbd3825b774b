"""The currency every layer above trades in: data splits, member architectures, the stacked
member outputs [K,B,C] and how they combine, attack objectives over them, keyed random streams,
and ensemble checkpoints (safetensors + JSON; loading runs no pickled code and never imports MLflow)."""
