"""Offline calibration that methods load as per-model JSON (EntropyPrune's Entropy Collapse Layer)."""
from .ecl import find_ecl, layer_entropies, calibrate_entropyprune

__all__ = ["find_ecl", "layer_entropies", "calibrate_entropyprune"]
