"""SAM modules; each file is one component."""
from sam_core.modeling.sam import Sam, build_sam

__all__ = ["Sam", "build_sam"]
