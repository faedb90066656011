"""Annotation modes: what each needs, its annotate stage and its row schema.

- ``AutomaticMode``: every image gets SAM's automatic masks (``pipeline.annotate.Annotator``).
- ``PromptedMode`` (``--prompts``): only the images that the prompts table names get masks, one
  per prompt (``pipeline.prompted.PromptedAnnotator``); prompts for images that ``--input`` does
  not hold become error rows, in a unit of their own.

``pipeline.run`` sees only this interface, so a new mode is one class here and its stage.
"""
from __future__ import annotations

import functools
import json
from typing import List, Optional, Set, Tuple

import pyarrow as pa

from pipeline import schema
from pipeline.config import AnnotateConfig
from pipeline.read import ItemSelector
from pipeline.units import KIND_PROMPT_ORPHANS, Plan, Unit


class AutomaticMode:
    """Automatic mask generation on every image."""

    name = "automatic"
    row_schema: pa.Schema = schema.OUTPUT_SCHEMA

    def prepare(self, config: AnnotateConfig) -> None:
        """Driver-side checks of what the mode reads besides the images; raises with one line."""

    def selector(self, config: AnnotateConfig) -> Optional[ItemSelector]:
        """For the read stage: which items get a row and what travels with them (None: all, nothing)."""
        return None

    def stage(self, config: AnnotateConfig) -> Tuple[type, dict]:
        """The annotate actor class and its constructor kwargs."""
        from pipeline.annotate import Annotator

        return Annotator, {"config": config.to_dict()}

    def extra_units(self, config: AnnotateConfig, plan: Plan, committed: Set[str], output) -> List[Unit]:
        """Units the mode adds to the input's own (``output``: the ``pipeline.sink.Output``)."""
        return []


class PromptedMode(AutomaticMode):
    """Masks from the boxes and points of a prompts table (the Grounded-SAM recipe)."""

    name = "prompted"

    def __init__(self):
        # Prompted images that already have their "not in --input" error row (final, as error
        # rows are): should one turn up in the input later, it gets no second row.
        self.answered: Tuple[str, ...] = ()

    @property
    def row_schema(self) -> pa.Schema:  # type: ignore[override]
        from pipeline.prompted import PROMPTED_OUTPUT_SCHEMA

        return PROMPTED_OUTPUT_SCHEMA

    def prepare(self, config: AnnotateConfig) -> None:
        from pipeline.prompted import load_prompts

        load_prompts(config)  # a missing table, or one without a uri column, stops the run here

    def selector(self, config: AnnotateConfig) -> Optional[ItemSelector]:
        from pipeline.prompted import select_prompted

        return functools.partial(select_prompted, config.prompts,
                                 json.dumps(config.storage_options or {}, sort_keys=True), frozenset(self.answered))

    def stage(self, config: AnnotateConfig) -> Tuple[type, dict]:
        from pipeline.prompted import annotate_stage

        return annotate_stage(config)

    def extra_units(self, config: AnnotateConfig, plan: Plan, committed: Set[str], output) -> List[Unit]:
        from pipeline.prompted import orphan_prompts_unit

        self.answered = tuple(output.uris_of_units(KIND_PROMPT_ORPHANS, committed))
        unit = orphan_prompts_unit(config, plan, committed)
        return [] if unit is None else [unit]


def mode_for(config: AnnotateConfig) -> AutomaticMode:
    return PromptedMode() if config.prompts else AutomaticMode()
