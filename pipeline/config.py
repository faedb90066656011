"""AnnotateConfig: the one object that describes a run.

It is built by the CLI (`jobs/annotate.py`), passed whole to `pipeline.run`, shipped to
the annotator actors, and serialised whole into the output's `_run.json`. Credentials in
`storage_options` are redacted whenever the config is serialised for a manifest or a log.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from pipeline.decode import DEFAULT_MAX_PIXELS
from pipeline.units import DEFAULT_UNIT_SIZE
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

# Fields that change what a row contains. A resumed run must agree with the output on these,
# otherwise one output would mix masks made with different settings.
RESULT_FIELDS = ("checkpoint", "model_type", "fast", *AMG_FIELDS, "max_pixels", "prompts", "multimask")


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

    # bfloat16 autocast in the generator, on GPU actors only (faster, near-identical masks).
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
    prompts: Optional[str] = None
    multimask: str = "auto"  # prompted mode: "auto" (as segment-anything advises), "always", "never"
    demo: bool = False

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


def dumps_public(config: AnnotateConfig) -> str:
    return json.dumps(config.to_public_dict(), sort_keys=True)
