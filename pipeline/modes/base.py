"""The interface ``pipeline.run`` sees: what a mode needs, its annotate stage and its row schema."""
from __future__ import annotations

from typing import List, Optional, Set, Tuple

import pyarrow as pa

from pipeline.config import AnnotateConfig
from pipeline.inputs.read import ItemSelector
from pipeline.inputs.units import Plan, Unit
from pipeline.output import schema


class Mode:
    """One way of annotating images. Subclasses set ``name`` and ``stage``; the rest has defaults."""

    name = "mode"
    row_schema: pa.Schema = schema.OUTPUT_SCHEMA

    def prepare(self, config: AnnotateConfig) -> None:
        """Driver-side checks of what the mode reads besides the images; raises with one line."""

    def selector(self, config: AnnotateConfig) -> Optional[ItemSelector]:
        """For the read stage: which items get a row and what travels with them (None: all, nothing)."""
        return None

    def stage(self, config: AnnotateConfig) -> Tuple[type, dict]:
        """The annotate actor class and its constructor kwargs."""
        raise NotImplementedError

    def extra_units(self, config: AnnotateConfig, plan: Plan, committed: Set[str], output) -> List[Unit]:
        """Units the mode adds to the input's own (``output``: the ``pipeline.output.sink.Output``)."""
        return []
