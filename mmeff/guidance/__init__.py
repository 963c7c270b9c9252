"""Guidance methods (perturbation guidance for DiTs; hallucination mitigation for VLMs)."""
