"""What every bench script reports the same way: the CPU it ran on, and its figures as JSON."""
from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Optional


def cpu_model() -> str:
    """The CPU's model name as `lscpu` gives it: a figure holds only for the CPU it was measured on."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def emit(figures: dict, json_path: Optional[str]) -> None:
    """Print the figures, and write them to ``json_path`` when one is given."""
    text = json.dumps(figures, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text)
