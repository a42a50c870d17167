"""Inference for every OFA task from a checkpoint: `Predictor` (Python) and `python -m ofa_ds.predict` (CLI).
docs/inference.md shows both."""
from .api import Prediction, Predictor
from .inputs import InputError

__all__ = ["Prediction", "Predictor", "InputError"]
