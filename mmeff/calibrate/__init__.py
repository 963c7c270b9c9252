"""Offline calibration that methods load as per-model JSON (EntropyPrune's Entropy Collapse Layer)."""
from .adaptinfer_schedule import calibrate_adaptinfer, inflection_layers
from .ecl import find_ecl, layer_entropies, calibrate_entropyprune

__all__ = ["find_ecl", "layer_entropies", "calibrate_entropyprune", "calibrate_adaptinfer", "inflection_layers"]
