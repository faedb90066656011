"""sam_core: Segment Anything in PyTorch, with no Ray dependency.

Public API::

    from sam_core import load_sam, build_sam, SamPredictor, SamConfig, AutomaticMaskGenerator

Everything except the configs is imported on first use (module ``__getattr__``), so that
``import sam_core`` stays cheap and each part loads only when a caller needs it.
"""
from importlib import import_module

from sam_core.config import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

# public name -> module that defines it
_LAZY = {
    "Sam": "sam_core.modeling.sam",
    "build_sam": "sam_core.modeling.sam",
    "load_sam": "sam_core.checkpoint",
    "CheckpointError": "sam_core.checkpoint",
    "SamPredictor": "sam_core.predictor",
    "ImageEmbedding": "sam_core.predictor",
    "ResizeLongestSide": "sam_core.transforms",
    "AutomaticMaskGenerator": "sam_core.amg.generator",
}

__all__ = ["SamConfig", "SamVisionConfig", "SamPromptEncoderConfig", "SamMaskDecoderConfig", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sam_core' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
