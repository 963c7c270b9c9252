"""The synthetic world and the small trained models shipped with mmeff."""
from __future__ import annotations

from .load import load

__all__ = ["load"]
