"""AnnotateConfig: the one object that describes a run.

It is built by the CLI (`jobs/annotate.py`), passed whole to `pipeline.run`, shipped to
the annotator actors, and serialised whole into the output's `_run.json`. Credentials in
`storage_options` are redacted whenever the config is serialised for a manifest or a log.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

from pipeline.inputs.decode import DEFAULT_MAX_PIXELS
from sam_core.amg.presets import PRESET_NAMES
from pipeline.inputs.units import DEFAULT_UNIT_SIZE
from pipeline.redact import redact_mapping

# The AutomaticMaskGenerator parameters a run passes through, by segment-anything's names.
AMG_FIELDS = (
    "points_per_side",
    "points_per_batch",
    "pred_iou_thresh",
    "stability_score_thresh",
    "stability_score_offset",
    "box_nms_thresh",
    "crop_n_layers",
    "crop_nms_thresh",
    "crop_overlap_ratio",
    "crop_n_points_downscale_factor",
    "min_mask_region_area",
)

MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
MULTIMASK_MODES = ("auto", "always", "never")  # prompted mode, see pipeline/modes/prompted.py
# Text mode (pipeline/modes/text.py): the prompt, the detector and how its boxes are kept.
TEXT_FIELDS = ("text", "detector", "box_threshold", "text_threshold", "label_nms")

# Fields that change what a row contains. A resumed run must agree with the output on these,
# otherwise one output would mix masks made with different settings.
RESULT_FIELDS = ("checkpoint", "model_type", "fast", *AMG_FIELDS, "max_pixels", "prompts", "multimask",
                 "image_column", "id_column", "sidecars", *TEXT_FIELDS)


@dataclass
class AnnotateConfig:
    """Everything one `sam-annotate` run needs.

    `num_actors` / `gpus_per_actor` left as None mean: one actor per GPU when the cluster
    has GPUs, otherwise CPU actors (see `pipeline.run.plan_actor_pool`).
    """

    input: str
    output: str
    checkpoint: str
    model_type: Optional[str] = None
    checkpoint_sha256: Optional[str] = None

    # AutomaticMaskGenerator parameters (names and defaults as in segment-anything).
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0

    # The named AMG settings the run started from (`--preset`); the AMG fields hold the values used.
    preset: Optional[str] = None

    # bfloat16 in the generator where it is faster than float32: GPUs, and CPUs whose bf16 products
    # measure faster (sam_core.amg.tuning.bfloat16_pays); near-identical masks.
    fast: bool = False

    # Scaling knobs.
    num_actors: Optional[int] = None
    gpus_per_actor: Optional[float] = None
    batch_size: int = 4
    # Images per unit of work (one commit record each), and most rows in one Parquet file.
    unit_size: int = DEFAULT_UNIT_SIZE
    rows_per_file: int = 256

    # Inputs and outputs.
    storage_options: dict = field(default_factory=dict)
    overwrite: bool = False
    limit: Optional[int] = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Shards: the Parquet column of image bytes (default: found), the id column for row URIs
    # (default: the row's index in its file), tar members carried into sidecar_<ext> columns.
    image_column: Optional[str] = None
    id_column: Optional[str] = None
    sidecars: List[str] = field(default_factory=list)
    prompts: Optional[str] = None
    multimask: str = "auto"  # prompted mode: "auto" (as segment-anything advises), "always", "never"
    # Text mode: boxes from a zero-shot detector (Hugging Face directory) for the classes of `text`
    # ("car. person."), the Grounded-SAM thresholds, and an optional per-label NMS IoU threshold.
    text: Optional[str] = None
    detector: Optional[str] = None
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    label_nms: Optional[float] = None
    demo: bool = False

    def validate(self) -> "AnnotateConfig":
        """Raise `ConfigError` naming every value no run can use; return self when all are usable.

        The CLI calls it before anything else and `pipeline.run.run` before it lists, writes or
        starts Ray, so that a bad value fails at once with its option's name instead of as a Ray
        traceback from inside an actor (`--points-per-side 0` was a ZeroDivisionError there).
        """
        problems = _problems(self)
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def amg_kwargs(self) -> dict:
        """Keyword arguments for `sam_core.AutomaticMaskGenerator` (output mode excluded)."""
        return {name: getattr(self, name) for name in AMG_FIELDS}

    def to_dict(self) -> dict:
        """All fields, secrets included: for shipping to workers, never for writing out."""
        return dataclasses.asdict(self)

    def to_public_dict(self) -> dict:
        """All fields with secret storage options redacted: safe for manifests and logs."""
        return redact_mapping(self.to_dict())

    @classmethod
    def for_stage(cls, **settings) -> "AnnotateConfig":
        """A config for the annotate stage alone (``Annotator`` on one's own Dataset): no input or output."""
        return cls.from_dict({"input": "", "output": "", **settings})

    @classmethod
    def from_dict(cls, values: dict) -> "AnnotateConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown AnnotateConfig fields: {unknown}")
        return cls(**values)

    def result_fields(self) -> dict:
        """The fields that determine row contents (compared on resume)."""
        return {name: getattr(self, name) for name in RESULT_FIELDS}


class ConfigError(ValueError):
    """AnnotateConfig values that no run can use; one line that names the options (`--points-per-side`)."""


def option_name(field_name: str) -> str:
    """The CLI option of a config field: `points_per_side` -> `--points-per-side`."""
    return "--" + field_name.replace("_", "-")


class _Range(NamedTuple):
    """The values a numeric field accepts: minimum <= value <= maximum (< maximum if `open_maximum`)."""

    field: str
    integer: bool
    minimum: float
    maximum: Optional[float] = None
    open_maximum: bool = False
    none_allowed: bool = False  # None: decided at run time (actors from the cluster) or no limit
    why: str = ""  # said after the range, when the reason is not obvious


# The AMG ranges are those segment-anything's generator can work with: an empty point grid divides
# by zero, predicted IoUs, stability scores and NMS thresholds are IoUs in [0, 1], crops overlap by
# less than their whole length.
_RANGES = (
    _Range("points_per_side", True, 1),
    _Range("points_per_batch", True, 1),
    _Range("pred_iou_thresh", False, 0, 1),
    _Range("stability_score_thresh", False, 0, 1),
    _Range("stability_score_offset", False, 0),
    _Range("box_nms_thresh", False, 0, 1),
    _Range("crop_n_layers", True, 0),
    _Range("crop_nms_thresh", False, 0, 1),
    _Range("crop_overlap_ratio", False, 0, 1, open_maximum=True),
    _Range("crop_n_points_downscale_factor", True, 1),
    _Range("min_mask_region_area", True, 0),
    _Range("batch_size", True, 1),
    _Range("unit_size", True, 1),
    _Range("rows_per_file", True, 1),
    _Range("num_actors", True, 1, none_allowed=True),
    _Range("gpus_per_actor", False, 0, 1, none_allowed=True, why=" (an actor runs its model on one GPU)"),
    _Range("limit", True, 1, none_allowed=True),
    _Range("max_pixels", True, 1),
    _Range("box_threshold", False, 0, 1),
    _Range("text_threshold", False, 0, 1),
    _Range("label_nms", False, 0, 1, none_allowed=True),
)
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def _problems(config: AnnotateConfig) -> List[str]:
    """What is wrong with ``config``, one phrase per option."""
    problems = []
    missing = [option_name(name) for name in ("input", "output", "checkpoint") if not getattr(config, name)]
    if missing:
        problems.append(f"{', '.join(missing)} must be given")
    for rule in _RANGES:
        value = getattr(config, rule.field)
        if value is None and rule.none_allowed:
            continue
        problem = _range_problem(rule, value)
        if problem:
            problems.append(f"{option_name(rule.field)} {problem}")
    if not problems and config.points_per_side < config.crop_n_points_downscale_factor ** config.crop_n_layers:
        # segment-anything's grid for crop layer i has points_per_side // factor**i points a side
        deepest = config.crop_n_points_downscale_factor ** config.crop_n_layers
        problems.append(
            f"--points-per-side must be ≥ --crop-n-points-downscale-factor ** --crop-n-layers "
            f"({config.crop_n_points_downscale_factor}**{config.crop_n_layers} = {deepest}) so that every crop "
            f"layer has points, got {config.points_per_side}"
        )
    if config.model_type is not None and config.model_type not in MODEL_TYPES:
        problems.append(f"--model-type must be one of {', '.join(MODEL_TYPES)}, got {config.model_type!r}")
    if config.preset is not None and config.preset not in PRESET_NAMES:
        problems.append(f"--preset must be one of {', '.join(PRESET_NAMES)}, got {config.preset!r}")
    if config.multimask not in MULTIMASK_MODES:
        problems.append(f"--multimask must be one of {', '.join(MULTIMASK_MODES)}, got {config.multimask!r}")
    if config.checkpoint_sha256 is not None and not _SHA256_HEX.fullmatch(str(config.checkpoint_sha256).strip()):
        problems.append("--checkpoint-sha256 must be 64 hexadecimal digits")
    if not isinstance(config.storage_options, dict):
        problems.append(f"--storage-options must be a JSON object, got a {type(config.storage_options).__name__}")
    problems += _text_mode_problems(config)
    bad_sidecars = [ext for ext in config.sidecars or () if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", str(ext))]
    if bad_sidecars:  # each becomes a column name, sidecar_<ext>
        problems.append(f"--sidecar must be a member extension such as json or cls, got {bad_sidecars[0]!r}")
    return problems


def _text_mode_problems(config: AnnotateConfig) -> List[str]:
    """--text and --detector come together, without --prompts, and the text names classes."""
    if config.text is None and config.detector is None:
        return []
    if config.text is None or not config.detector:
        return ["--text and --detector must be given together (text mode)"]
    problems = []
    if config.prompts:
        problems.append("--text and --prompts cannot be combined: boxes come from the detector or from the table")
    from sam_core.detector import DetectorError, parse_text_prompt  # torch, but not transformers

    try:
        parse_text_prompt(config.text)
    except DetectorError as exc:
        problems.append(f"--text {exc}")
    return problems


def _range_problem(rule: _Range, value) -> Optional[str]:
    kind = "an integer" if rule.integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if rule.integer else numbers.Real):
        return f"must be {kind}, got {value!r}"
    if not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    low = _number(rule.minimum)
    if rule.maximum is None:
        inside, wanted = value >= rule.minimum, f"≥ {low}"
    elif rule.open_maximum:
        inside, wanted = rule.minimum <= value < rule.maximum, f"≥ {low} and < {_number(rule.maximum)}"
    else:
        inside, wanted = rule.minimum <= value <= rule.maximum, f"between {low} and {_number(rule.maximum)}"
    return None if inside else f"must be {wanted}{rule.why}, got {_number(value)}"


def _number(value) -> str:
    """1, 0.5, 0.341333: integers whole, floats short."""
    return str(value) if isinstance(value, numbers.Integral) else f"{value:g}"


def dumps_public(config: AnnotateConfig) -> str:
    return json.dumps(config.to_public_dict(), sort_keys=True)
