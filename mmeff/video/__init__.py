"""Video sparse attention methods for DiTs."""
