"""pipeline: the Ray Data job around sam_core (no model internals here).

    from pipeline.config import AnnotateConfig
    from pipeline.run import run
    summary = run(AnnotateConfig(input="s3://b/images/", output="s3://b/sam/", checkpoint="s3://b/sam_vit_h.pth"))

Modules, in the order an image meets them: `config` (AnnotateConfig), `units` (the input cut into
units of work; `sources` lists prefixes), `read`, `decode`, `modes` (automatic or prompted),
`annotate` (the actor), `schema` (the output contract), `sink` (worker-side writes, driver-side
commits, the output layout), `run` (the plan).
`pipeline.AnnotateConfig` is imported on first use, so `import pipeline.output.schema` stays light.
"""
from importlib import import_module

_LAZY = {"AnnotateConfig": "pipeline.config", "RunSummary": "pipeline.run"}

__all__ = list(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(import_module(module), name)
