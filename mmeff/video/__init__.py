"""Video sparse attention methods for DiTs (configs; the DiT host adapter runs them)."""
from .rectified_spaattn import RectifiedSpaAttn
from .vmoba import VMoBA

__all__ = ["RectifiedSpaAttn", "VMoBA"]
