"""cs2fusion: CS2Fusion infrared + visible image fusion (Wang et al., Information Fusion 102, 2024)."""

__version__ = "0.1.0"
