"""What a trained ensemble is worth: the evaluation protocol (clean, attacks, UAP, transfer,
diversity, Jacobian norms) and the scalar metrics built from it (weighted accuracy, AUC)."""
