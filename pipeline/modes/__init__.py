"""Annotation modes: what each needs, its annotate stage and its row schema (``base.Mode``).

- ``automatic.AutomaticMode``: every image gets SAM's automatic masks (``automatic.Annotator``).
- ``prompted.PromptedMode`` (``--prompts``): only the images that the prompts table names get masks,
  one per prompt (``prompted.PromptedAnnotator``); prompts for images that ``--input`` does not hold
  become error rows, in a unit of their own.
- ``text.TextMode`` (``--text`` with ``--detector``): a zero-shot detector finds boxes for the text's
  classes and SAM segments them, in one actor (``text.TextAnnotator``); every mask is labelled.

``stage`` holds what the modes' actors share. ``pipeline.run`` sees only the ``Mode`` interface, so a
new mode is one module here and one line in ``mode_for``.
"""
from __future__ import annotations

from pipeline.config import AnnotateConfig
from pipeline.modes.base import Mode


def mode_for(config: AnnotateConfig) -> Mode:
    """The mode a config asks for (``--text``: text, ``--prompts``: prompted, otherwise automatic)."""
    if config.text is not None:
        from pipeline.modes.text import TextMode

        return TextMode()
    if config.prompts:
        from pipeline.modes.prompted import PromptedMode

        return PromptedMode()
    from pipeline.modes.automatic import AutomaticMode

    return AutomaticMode()


__all__ = ["Mode", "mode_for"]
