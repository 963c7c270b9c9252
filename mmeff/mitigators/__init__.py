"""Hallucination mitigators (configs and their steering hooks): VHR and GIFT."""
from .base import MitigatorConfig
from .gift import GIFT
from .vhr import VHR

__all__ = ["MitigatorConfig", "GIFT", "VHR"]
