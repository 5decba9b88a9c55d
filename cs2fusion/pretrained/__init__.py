"""The project's default pretrained model: CS2Fusion trained by this pipeline on RoadScene (see MODEL_CARD.md).

It is what ``cs2fusion fuse`` uses when no ``--model`` is given.
"""

from pathlib import Path

DEFAULT_MODEL = Path(__file__).with_name("roadscene.safetensors")
MODEL_CARD = Path(__file__).with_name("MODEL_CARD.md")
