"""DVC stage entry points (``python -m pipeline.<stage>``) and the thin Ray / MLflow adapters."""
