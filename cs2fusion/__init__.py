"""cs2fusion: CS2Fusion infrared + visible image fusion (Wang et al., Information Fusion 102, 2024).

``cs2fusion.fuse_pair(ir, vi)`` fuses one pair with the shipped model (see :mod:`cs2fusion.inference.api`).
"""

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `import cs2fusion.<module>` does not load torch and the model.
    if name == "fuse_pair":
        return importlib.import_module("cs2fusion.inference.api").fuse_pair
    raise AttributeError(f"module 'cs2fusion' has no attribute {name!r}")
