"""The MLflow pyfunc model of a registered ensemble, logged as code (MLflow's models-from-code).

`mlflow.pyfunc.load_model` runs this file against the raysweep installed where it loads. It unpickles
nothing and puts no bundled copy of raysweep on sys.path. The weights come from the model's
`checkpoint` artifact, safetensors plus a JSON manifest checked field by field (raysweep.checkpoint).
"""
import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from raysweep.core.checkpoint import load


class EnsembleModel(PythonModel):
    """predict(images [B,C,H,W] float32 in [0,1]) -> ensemble probabilities [B, num_classes]."""

    def load_context(self, context):
        self.ensemble = load(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        return self.ensemble.predict_proba(x).numpy()


mlflow.models.set_model(EnsembleModel())
