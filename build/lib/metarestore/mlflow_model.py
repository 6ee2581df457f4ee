"""MLflow models-from-code pyfunc around a metarestore checkpoint (safetensors + JSON, no pickle).

``mlflow.pyfunc.load_model("models:/metarestore@latest").predict(images)`` restores a batch of images:
a numpy array (N, H, W, 3), uint8 or float in [0, 1]; returns float32 in [0, 1] of the same shape.
"""

import mlflow
import numpy as np
import torch


class MetaRestoreModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from metarestore.hub import load_learner

        self.learner, self.metadata = load_learner(context.artifacts["checkpoint"])

    # np.ndarray: a hint MLflow takes as "no schema to infer" (images of any size), which also keeps its
    # "add type hints" warning off the console (its own once-filter overrides a caller's)
    def predict(self, context, model_input: np.ndarray, params=None):
        array = np.asarray(model_input)
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(0, 3, 1, 2)
        return self.learner.restore(x).permute(0, 2, 3, 1).numpy()


mlflow.models.set_model(MetaRestoreModel())
