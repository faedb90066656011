"""The prompts table of prompted mode: parse it, group it per image, check it against the image.

The table (one Parquet file, or a folder of them, on any fsspec store; ``prompt_index`` sorts it by
image into the output) has one row per image, or several rows for the same image, which are
concatenated in table order:

| column         | type                                   | notes                                        |
|----------------|----------------------------------------|----------------------------------------------|
| `uri`          | string                                 | the image URI exactly as `--input` lists it  |
| `boxes`        | list<list<float64>>                    | XYXY, pixels of the original (upright) image |
| `points`       | list<list<float64>> or list<list<list<float64>>> | one `[x, y]` per prompt, or several clicks per prompt |
| `point_labels` | list<int> or list<list<int>>           | 1 foreground, 0 background; default all 1    |
| `labels`       | list<string> (or `label`)              | optional, one per prompt, carried to output  |
| `scores`       | list<float64> (or `score`)             | optional, one per prompt, carried to output  |

All columns but `uri` are optional. A row's prompts are its boxes first, then its point prompts;
`labels`/`scores` follow that order (a scalar is given to every prompt of the row). A single box
may be written flat (`[x0, y0, x1, y1]`), so a one-detection-per-row table works as it is.

A malformed row does not stop the run: it becomes an error for its image (``ImagePrompts.error``).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

PROMPT_COLUMNS = ("uri", "boxes", "points", "point_labels", "labels", "label", "scores", "score")
# A row's position in the whole table, where a copy of the table carries it (the sorted index).
TABLE_ROW = "row"


class PromptError(ValueError):
    """A prompt that cannot be used; the message names the prompt and says why, for a person."""


@dataclass(frozen=True)
class Prompt:
    """One prompt for one image, in pixel coordinates of the original upright image.

    box_xyxy: 4 floats or None.  point_coords: K [x, y] pairs (K >= 1) or None.
    point_labels: K ints (1 foreground, 0 background) or None.  At least one of box/points is set.
    """

    index: int
    box_xyxy: Optional[tuple[float, ...]] = None
    point_coords: Optional[tuple[tuple[float, float], ...]] = None
    point_labels: Optional[tuple[int, ...]] = None
    label: Optional[str] = None
    score: Optional[float] = None

    def describe(self) -> str:
        what = f"box {list(self.box_xyxy)}" if self.box_xyxy is not None else f"points {_lists(self.point_coords)}"
        return f"prompt {self.index} ({what})"


@dataclass
class ImagePrompts:
    """All prompts for one image, or why they cannot be used."""

    uri: str
    prompts: list[Prompt] = field(default_factory=list)
    error: Optional[str] = None

    def to_json(self) -> str:
        return json.dumps({"prompts": [asdict(p) for p in self.prompts], "error": self.error})

    @classmethod
    def from_json(cls, uri: str, text: str) -> "ImagePrompts":
        data = json.loads(text)
        prompts = [
            Prompt(
                index=p["index"],
                box_xyxy=None if p["box_xyxy"] is None else tuple(p["box_xyxy"]),
                point_coords=None if p["point_coords"] is None else tuple(tuple(c) for c in p["point_coords"]),
                point_labels=None if p["point_labels"] is None else tuple(p["point_labels"]),
                label=p["label"],
                score=p["score"],
            )
            for p in data["prompts"]
        ]
        return cls(uri=uri, prompts=prompts, error=data["error"])


def _lists(value):
    return [list(v) for v in value] if value is not None else None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_floats(values, what: str, expected: int) -> tuple[float, ...]:
    if not isinstance(values, (list, tuple)) or len(values) != expected or not all(_is_number(v) for v in values):
        raise PromptError(f"{what} must be {expected} numbers, got {values!r}")
    if not all(math.isfinite(v) for v in values):
        raise PromptError(f"{what} has a non-finite coordinate: {list(values)}")
    return tuple(float(v) for v in values)


def _boxes(value) -> list[tuple[float, ...]]:
    if value is None:
        return []
    if len(value) > 0 and _is_number(value[0]):
        value = [value]  # one flat box
    boxes = []
    for k, box in enumerate(value):
        x0, y0, x1, y1 = _finite_floats(box, f"box {k}", 4)
        if not (x1 > x0 and y1 > y0):
            raise PromptError(f"box {k} {[x0, y0, x1, y1]} is not XYXY with x1 > x0 and y1 > y0")
        boxes.append((x0, y0, x1, y1))
    return boxes


def _point_prompts(points, labels) -> list[tuple[tuple[tuple[float, float], ...], tuple[int, ...]]]:
    if points is None:
        if labels:
            raise PromptError("point_labels given without points")
        return []
    if labels is not None and len(labels) != len(points):
        raise PromptError(f"{len(points)} point prompts but {len(labels)} point_labels")
    prompts = []
    for k, clicks in enumerate(points):
        if clicks is not None and len(clicks) > 0 and _is_number(clicks[0]):
            clicks = [clicks]  # one click per prompt, written [x, y]
        if not clicks:
            raise PromptError(f"point prompt {k} has no points")
        coords = tuple(_finite_floats(c, f"point prompt {k}", 2) for c in clicks)
        click_labels = None if labels is None else labels[k]
        if click_labels is None:
            click_labels = [1] * len(coords)
        elif _is_number(click_labels):
            click_labels = [click_labels]
        if len(click_labels) != len(coords) or any(v not in (0, 1) for v in click_labels):
            raise PromptError(f"point prompt {k} needs one label (1 foreground, 0 background) per point, "
                              f"got {list(click_labels)} for {len(coords)} point(s)")
        prompts.append((coords, tuple(int(v) for v in click_labels)))
    return prompts


def _per_prompt(value, count: int, what: str) -> list:
    if value is None:
        return [None] * count
    if not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) != count:
        raise PromptError(f"{len(value)} {what} for {count} prompts (boxes first, then points)")
    return list(value)


def parse_prompt_row(row: dict, first_index: int = 0) -> list[Prompt]:
    """One table row -> its prompts, numbered from ``first_index``. Raises PromptError."""
    boxes = _boxes(row.get("boxes"))
    point_prompts = _point_prompts(row.get("points"), row.get("point_labels"))
    count = len(boxes) + len(point_prompts)
    labels = _per_prompt(row.get("labels", row.get("label")), count, "labels")
    scores = _per_prompt(row.get("scores", row.get("score")), count, "scores")
    prompts = []
    for k, box in enumerate(boxes):
        prompts.append(Prompt(index=first_index + k, box_xyxy=box))
    for k, (coords, click_labels) in enumerate(point_prompts, start=len(boxes)):
        prompts.append(Prompt(index=first_index + k, point_coords=coords, point_labels=click_labels))
    return [
        Prompt(p.index, p.box_xyxy, p.point_coords, p.point_labels,
               None if label is None else str(label), None if score is None else float(score))
        for p, label, score in zip(prompts, labels, scores)
    ]


def group_prompt_rows(rows) -> dict[str, ImagePrompts]:
    """Table rows (dicts) -> ImagePrompts per URI, in first-seen order; bad rows become errors."""
    grouped: dict[str, ImagePrompts] = {}
    for row_number, row in enumerate(rows):
        uri = row.get("uri")
        if not uri:
            raise PromptError(f"prompts table row {row.get(TABLE_ROW, row_number)} has no uri")
        add_prompt_row(grouped.setdefault(uri, ImagePrompts(uri)), row, row.get(TABLE_ROW, row_number))
    return grouped


def add_prompt_row(image: ImagePrompts, row: dict, row_number: int) -> None:
    """Append one table row's prompts to ``image``; a bad row makes the whole image an error."""
    if image.error is not None:
        return
    try:
        image.prompts.extend(parse_prompt_row(row, first_index=len(image.prompts)))
    except PromptError as exc:
        image.prompts, image.error = [], f"bad prompts in table row {row_number}: {exc}"


def outside_image(prompt: Prompt, width: int, height: int) -> bool:
    """True if any coordinate of ``prompt`` lies outside ``[0, width] x [0, height]``."""
    xs, ys = [], []
    if prompt.box_xyxy is not None:
        xs += [prompt.box_xyxy[0], prompt.box_xyxy[2]]
        ys += [prompt.box_xyxy[1], prompt.box_xyxy[3]]
    for x, y in prompt.point_coords or ():
        xs.append(x)
        ys.append(y)
    return min(xs) < 0 or min(ys) < 0 or max(xs) > width or max(ys) > height


def check_prompts_fit(prompts: list[Prompt], width: int, height: int) -> Optional[str]:
    """Why these prompts cannot be used on a ``width`` x ``height`` image, or None if they can.

    No prompts is fine (a detector may find nothing): the image gets an ok row with no masks.
    One prompt outside the image fails the whole image: it usually means the table's coordinates are
    in another frame (normalised, resized, or before EXIF rotation), so its other prompts are suspect too.
    """
    bad = [p for p in prompts if outside_image(p, width, height)]
    if not bad:
        return None
    shown = "; ".join(p.describe() for p in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    return (f"{len(bad)} of {len(prompts)} prompts lie outside the {width}x{height} image "
            f"(coordinates must be pixels of the upright original image): {shown}")
