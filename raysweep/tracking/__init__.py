"""MLflow: runs (the one place they open and close), the model registry and the pyfunc model file."""
