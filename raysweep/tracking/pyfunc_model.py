"""The MLflow pyfunc model of a registered ensemble, logged as code (MLflow's models-from-code).

`mlflow.pyfunc.load_model` runs this file against the raysweep installed where it loads. It unpickles
nothing and puts no bundled copy of raysweep on sys.path. The weights come from the model's
`checkpoint` artifact, safetensors plus a JSON manifest checked field by field (raysweep.checkpoint).

Input rule (`images`): a batch [B, C, H, W] of the training images' shape, as
- float (any precision) in [0, 1], used as float32; or
- uint8 in [0, 255], divided by 255.
Anything else (another dtype, floats outside [0, 1], another shape) is refused with one line that says
what was expected. The logged signature declares the output only: MLflow's tensor schema would refuse
float64 input before this rule could convert it.
"""
import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from raysweep.core.checkpoint import load, read_manifest


def as_images(model_input, shape: tuple[int, ...]) -> torch.Tensor:
    """`model_input` as float32 images in [0, 1] of `shape` [C, H, W] per image, by the rule above."""
    x = np.asarray(model_input)
    want = f"[B, {', '.join(map(str, shape))}]"

    def refuse(why: str):
        raise MlflowException(f"images: {why}; expected {want} float in [0, 1] or uint8 in [0, 255]",
                              error_code=INVALID_PARAMETER_VALUE)

    if x.ndim != 1 + len(shape) or tuple(x.shape[1:]) != tuple(shape):
        refuse(f"got shape {list(x.shape)}")
    if x.dtype == np.uint8:
        return torch.from_numpy(x.astype(np.float32) / 255.0)
    if not np.issubdtype(x.dtype, np.floating):
        refuse(f"got dtype {x.dtype}")
    x = x.astype(np.float32)
    if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
        refuse(f"got values in [{np.nanmin(x):g}, {np.nanmax(x):g}] (divide 0-255 images by 255, or pass uint8)")
    return torch.from_numpy(x)


class EnsembleModel(PythonModel):
    """predict(images) -> ensemble probabilities [B, num_classes] float32 (images: the module docstring)."""

    def load_context(self, context):
        self.ensemble = load(context.artifacts["checkpoint"])
        self.shape = tuple(read_manifest(context.artifacts["checkpoint"])["image_shape"])

    def predict(self, context, model_input, params=None):
        return self.ensemble.predict_proba(as_images(model_input, self.shape)).numpy()


mlflow.models.set_model(EnsembleModel())
