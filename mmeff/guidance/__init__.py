"""Guidance methods (perturbation guidance for DiTs; hallucination mitigation for VLMs)."""
from .headhunter import HeadHunter, SearchResult
from .softpag import SoftPAG, load_preset, save_preset

__all__ = ["HeadHunter", "SearchResult", "SoftPAG", "load_preset", "save_preset"]
