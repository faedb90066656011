"""The processes of one job, read from /proc: the benches kill or measure them by family."""
from __future__ import annotations

import os
from pathlib import Path

ANNOTATOR_TITLE = "MapBatches(Annotator)"  # in the Ray process title of each annotator actor


def descendants(root: int) -> list:
    """``root`` and every process below it, as PIDs (processes that vanish meanwhile are skipped)."""
    children: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def is_annotator(pid: int) -> bool:
    try:
        return ANNOTATOR_TITLE in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
