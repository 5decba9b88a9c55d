"""The MLflow pyfunc wrapper: a cs2fusion checkpoint as an artifact, with our own pre/post-processing.

Logged as "model from code" (this file, not a pickled object), so loading a registry version never unpickles.

Input: ``{"ir": uint8 (N, H, W), "vi": uint8 (N, H, W, C)}`` with C = 1 (grey) or 3 (RGB), any H×W;
output: fused uint8 (N, H, W, C) — colour where the visible image is colour, exactly as ``cs2fusion fuse``.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1), "ir"),
                   TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1), "vi")]),
    outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1), "fused")]),
)


class FusionModel(mlflow.pyfunc.PythonModel):
    """Fuses IR/visible arrays with the checkpoint stored as the ``checkpoint`` artifact."""

    # MLflow checks predict's type hints when the class is created and warns without them. Named tensors (a dict
    # of arrays) have no type hint in MLflow 3's system (its hints are list[...] of records), so there is none to
    # give: the explicit TensorSpec signature validates the input instead. This is MLflow's own switch for classes
    # that validate another way (its ChatModel uses it); the warning cannot be filtered (MLflow resets filters).
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from cs2fusion.checkpoint import load_checkpoint
        from cs2fusion.inference import Fuser

        self.fuser = Fuser(load_checkpoint(context.artifacts["checkpoint"]).backbone)

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (see _skip_type_hint_validation)
        return self.fuser.fuse_stack(vis=np.asarray(model_input["vi"]), ir=np.asarray(model_input["ir"]))


mlflow.models.set_model(FusionModel())
