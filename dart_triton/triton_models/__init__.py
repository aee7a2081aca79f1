"""Triton python-backend models. Each `model_repository/<name>/1/model.py` re-exports one."""
