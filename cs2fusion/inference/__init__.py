"""Inference: :class:`Fuser` (the image API) over :class:`InferenceGraph` (the fast forward pass), its heads
(direct convs or the compiled Winograd kernel, chosen once), exact tiling, and batch fusion of shards.

Layout: ``fuser`` (public API) → ``graph`` (encoders, gates, decoder) → ``heads`` (decoder conv 1 + DDM queries)
→ ``convs`` / ``kernels`` (the ops); ``tiling`` and ``buffers`` are helpers; ``batch`` fuses shards to PNGs;
``api`` is the one-call :func:`~cs2fusion.inference.api.fuse_pair`.
"""

from cs2fusion.inference.fuser import DEVICES, PRECISIONS, FuseOptions, Fuser, resolve_device
from cs2fusion.inference.graph import InferenceGraph

__all__ = ["DEVICES", "PRECISIONS", "FuseOptions", "Fuser", "InferenceGraph", "resolve_device"]
