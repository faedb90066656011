"""Argument parsing shared by `sam-annotate`, `jobs.export` and `jobs.preview`.

A wrong argument is one line on stderr, as every other error of these commands is, instead of the
whole usage text; and a JSON option's error never repeats the text, which may hold credentials.
"""
from __future__ import annotations

import argparse
import json

from pipeline.redact import redact_text

_JSON_TYPE_NAMES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
                    type(None): "null"}


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is `<prog>: error: <what> (see --help)` and exit status 2."""

    def error(self, message: str):
        # argparse quotes the offending argument (e.g. an unrecognised one): mask credential shapes in it
        self.exit(2, f"{self.prog}: error: {redact_text(message)} (see --help)\n")


def json_object(text: str) -> dict:
    """The `--storage-options` type: a JSON object. Errors say where the JSON breaks, not what it says."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object {{...}}, got {_JSON_TYPE_NAMES[type(value)]}")
    return value
