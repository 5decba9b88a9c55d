"""CS2Fusion networks: the fusion backbone and the training-only compensation perception network."""

from cs2fusion.model.backbone import Backbone, BackboneOutput, DemandDrivenModule, DenseEncoder, EncoderFeatures
from cs2fusion.model.cpn import CompensationPerceptionNetwork, CPNOutput

__all__ = [
    "Backbone",
    "BackboneOutput",
    "CPNOutput",
    "CompensationPerceptionNetwork",
    "DemandDrivenModule",
    "DenseEncoder",
    "EncoderFeatures",
]
