"""`sam-annotate` / `python -m jobs.annotate`: pseudo-label an image corpus with SAM.

    python -m jobs.annotate --input s3://bucket/images/ --output s3://bucket/sam/ \\
        --checkpoint s3://bucket/models/sam_vit_h_4b8939.pth

Run with no arguments (or `--demo`) it annotates the photos bundled in `jobs/samples/` with a
random-weight tiny model on local Ray, so a new user sees the whole job work offline. Those
masks are meaningless; with a real `--checkpoint` the same command is the real job.

This module only turns arguments into an `AnnotateConfig` (checked before anything else happens)
and calls `pipeline.run.run`, with Ray's console kept to what may be wrong unless `--verbose`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional

from jobs.arguments import OneLineErrorParser, json_object
from pipeline.config import AMG_FIELDS, MODEL_TYPES, MULTIMASK_MODES, AnnotateConfig, ConfigError, option_name
from pipeline.inputs.decode import DEFAULT_MAX_PIXELS
from sam_core.amg.presets import PRESET_NAMES, preset_parameters

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
DEMO_OUTPUT = "demo-output"
DEMO_CHECKPOINT = Path(tempfile.gettempdir()) / "sam-annotate-demo" / "random-tiny-sam-v1.pth"
# The demo's random model: small enough for 2 CPU cores, same code path as a real checkpoint.
DEMO_SIZES = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=2, window_size=8, global_attn_indexes=(1,), image_size=512
)
DEMO_AMG = dict(points_per_side=4, points_per_batch=64, pred_iou_thresh=0.0, stability_score_thresh=0.0)

DEMO_NOTICE = """
################################################################################
#  DEMO MODE: the model has RANDOM WEIGHTS. Its masks are MEANINGLESS.         #
#  It shows the job working end to end, offline. For real masks pass           #
#  --checkpoint with official SAM weights (sam_vit_h_4b8939.pth) or a          #
#  Hugging Face SAM directory, and --input / --output of your corpus.          #
################################################################################
"""


def build_parser() -> argparse.ArgumentParser:
    defaults = AnnotateConfig(input="", output="", checkpoint="")
    parser = OneLineErrorParser(
        prog="sam-annotate",
        description="Annotate images with SAM automatic mask generation: one Parquet row per image, COCO-RLE masks. "
        "--input, --output and --checkpoint are required unless --demo is given; "
        "with no arguments at all it runs --demo.",
    )
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--input", help="prefix or glob (walked recursively for images, .tar and .parquet shards), "
                    "WebDataset brace notation (s3://b/sa_{000000..000999}.tar), a .txt / .parquet manifest of URIs "
                    "or of shards, or one Parquet file of image bytes; required unless --demo (default there: the "
                    "bundled sample photos)")
    io.add_argument("--output", help="output root (local path or fsspec URL); required unless --demo "
                    f"(default there: ./{DEMO_OUTPUT})")
    io.add_argument("--checkpoint", help="official .pth, or a Hugging Face SAM directory / model.safetensors (path or "
                    "URL); required unless --demo (default there: a random-weight tiny model)")
    io.add_argument("--checkpoint-sha256", help="refuse the checkpoint unless its sha256 is this (default: not checked)")
    io.add_argument("--model-type", choices=MODEL_TYPES, help="default: read from the checkpoint")
    io.add_argument("--storage-options", type=json_object, default={}, metavar="JSON",
                    help='fsspec options, e.g. \'{"client_kwargs": {"endpoint_url": "http://..."}}\'; '
                    "default: {}, the standard AWS environment")
    io.add_argument("--overwrite", action="store_true",
                    help="delete this tool's files in --output and start clean (default: resume)")
    io.add_argument("--limit", type=int, help="annotate only the first N inputs (sorted) (default: all)")
    io.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                    help=f"larger images become error rows (decompression-bomb guard) (default {DEFAULT_MAX_PIXELS})")
    io.add_argument("--image-column", help="Parquet shards: the column of image bytes (default: an HF image "
                    "struct<bytes, path>, else a binary column)")
    io.add_argument("--id-column", help="Parquet shards: the column that names each row in its uri "
                    "(default: the row's index in its file)")
    io.add_argument("--sidecar", dest="sidecars", action="append", default=[], metavar="EXT",
                    help="tar shards: carry each image's EXT member (e.g. json) into a sidecar_EXT column; repeatable "
                    "(default: none)")
    io.add_argument("--prompts", help="Parquet of boxes/points per uri: prompted mode instead of automatic masks "
                    "(default: automatic masks)")
    io.add_argument("--multimask", choices=MULTIMASK_MODES, default="auto",
                    help="with --prompts or --text: auto = one mask for boxes, best of 3 for a single click (default auto)")
    text = parser.add_argument_group("text mode (Grounded SAM: boxes from a zero-shot detector, then SAM)")
    text.add_argument("--text", help='classes to find, dot-separated, e.g. "car. person. dog."; needs --detector '
                      "(default: off, automatic masks)")
    text.add_argument("--detector", help="Hugging Face zero-shot object detection directory (Grounding DINO, OWLv2, "
                      "OWL-ViT; path or URL) saved with save_pretrained, safetensors weights "
                      "(default: none; needed with --text)")
    text.add_argument("--box-threshold", type=float, default=defaults.box_threshold,
                      help=f"minimum detector box score (default {defaults.box_threshold:g})")
    text.add_argument("--text-threshold", type=float, default=defaults.text_threshold,
                      help="Grounding DINO: minimum score of a prompt word for it to label a box "
                      f"(default {defaults.text_threshold:g})")
    text.add_argument("--label-nms", type=float, metavar="IOU",
                      help="drop a box whose IoU with a better box of the same class exceeds IOU (default: off)")
    demo_amg = ", ".join(f"{option_name(name)} {value:g}" for name, value in DEMO_AMG.items())
    io.add_argument("--demo", action="store_true", help="annotate the bundled sample photos with a random-weight "
                    f"model and, unless given, {demo_amg} (default: off, on when no argument is given)")

    amg = parser.add_argument_group("automatic mask generation (segment-anything's parameters)")
    amg.add_argument("--preset", choices=PRESET_NAMES,
                     help="named AMG settings, e.g. sa1b: the SA-1B paper's automatic stage (32x32 points on the "
                     "image and on 20 crops in 2 layers, IoU 0.88, stability 0.95, NMS 0.7, regions under 100 px "
                     "removed); options given beside it win (default: none, segment-anything's defaults)")
    for name in AMG_FIELDS:
        value = getattr(defaults, name)
        amg.add_argument(option_name(name), type=type(value), default=value, help=f"default {value:g}")

    scale = parser.add_argument_group("scaling")
    scale.add_argument("--num-actors", type=int, help="annotator actors; default one per GPU, else one per CPU")
    scale.add_argument("--gpus-per-actor", type=float, help="default 1 on a GPU cluster, 0 otherwise")
    scale.add_argument("--fast", action="store_true",
                       help="bfloat16 on GPU actors, and on CPU actors where this CPU's bf16 products measure faster "
                       "than float32: faster, near-identical masks (default: off, float32)")
    scale.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help=f"images per encoder batch (default {defaults.batch_size})")
    scale.add_argument("--unit-size", type=int, default=defaults.unit_size,
                       help="images per unit of work: one commit record each, and the most a rerun redoes "
                       f"(default {defaults.unit_size})")
    scale.add_argument("--rows-per-file", "--rows-per-shard", dest="rows_per_file", type=int,
                       default=defaults.rows_per_file, help=f"most rows in one Parquet file (default {defaults.rows_per_file})")
    scale.add_argument("--ray-address", help="Ray cluster to join; default RAY_ADDRESS or a local Ray")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on stderr)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own lines too: its start-up, Ray Data's plan and progress, and the notices "
                        "it prints on every run (default: our progress and summary, Ray's other warnings and errors)")
    return parser


def config_from_args(args: argparse.Namespace) -> AnnotateConfig:
    """Arguments -> AnnotateConfig; the demo fills in what was not given."""
    values = {k: v for k, v in vars(args).items() if k in AnnotateConfig.__dataclass_fields__}
    if args.demo:
        values["input"] = values["input"] or str(SAMPLES_DIR)
        values["output"] = values["output"] or DEMO_OUTPUT
        values["checkpoint"] = values["checkpoint"] or str(DEMO_CHECKPOINT)
    if args.preset:
        _fill_defaults(values, preset_parameters(args.preset))
    if args.demo:
        _fill_defaults(values, DEMO_AMG)
    missing = [f"--{name}" for name in ("input", "output", "checkpoint") if not values.get(name)]
    if missing:
        raise SystemExit(f"sam-annotate: error: {', '.join(missing)} required (or run with --demo)")
    config = AnnotateConfig.from_dict(values).validate()  # before the demo model is made: nothing written
    if config.checkpoint == str(DEMO_CHECKPOINT):
        demo_checkpoint()
    return config


def _fill_defaults(values: dict, settings: dict) -> None:
    """Take ``settings`` for every option the user left at the parser's default (a preset, the demo)."""
    parser_defaults = vars(build_parser().parse_args([]))
    for name, value in settings.items():
        if values[name] == parser_defaults[name]:
            values[name] = value


def demo_checkpoint() -> Path:
    """A random-weight tiny SAM saved as an official .pth, made once per machine (fixed seed)."""
    import torch

    from sam_core import SamConfig, SamPromptEncoderConfig, SamVisionConfig, build_sam

    path = DEMO_CHECKPOINT
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = SamConfig(
            vision_config=SamVisionConfig(**DEMO_SIZES),
            prompt_encoder_config=SamPromptEncoderConfig(image_size=DEMO_SIZES["image_size"]),
        )
        model = build_sam(config)
        with torch.no_grad():  # random, not near-zero, so that the demo draws some masks
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(model.state_dict(), partial)
    os.replace(partial, path)
    return path


def init_ray(address: Optional[str], verbose: bool = False) -> None:
    """Join the given or ambient (RAY_ADDRESS, `ray job submit`) cluster, or start a local Ray.

    Unless `verbose`, Ray's console says only what may be wrong (see `quiet_ray_console`).
    """
    import ray

    if not verbose:
        quiet_ray_console()
    if ray.is_initialized():
        return
    quiet = {} if verbose else {"logging_level": logging.WARNING}  # not "Started a local Ray instance."
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **quiet)
        return
    # Local Ray: workers must import this checkout even when it is not pip-installed.
    root = str(Path(__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **quiet)


class _DropMessages(logging.Filter):
    """Drops the records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# Warnings Ray gave on every run, each its answer to a choice made on purpose; Ray Data's log file in the
# session directory keeps its own. The "disabled" counterpart of the first one is kept: that one matters.
_RAY_AUTH_NOTICE = _DropMessages("Token authentication is enabled for this Ray cluster")  # Ray's default
_RAY_DATA_NOTICES = _DropMessages("Progress bars disabled")  # pipeline/run.py turns them off: we draw our own


def quiet_ray_console() -> None:
    """Ray's console lines on the driver: warnings and errors only, less the expected ones above."""
    import ray.data  # noqa: F401  (its import sets up the "ray.data" logger's handlers, which we adjust)

    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if _RAY_AUTH_NOTICE not in auth.filters:
        auth.addFilter(_RAY_AUTH_NOTICE)
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":  # its file handlers keep Ray Data's full log
            handler.setLevel(logging.WARNING)  # not the plan, start and end of every execution
            if _RAY_DATA_NOTICES not in handler.filters:
                handler.addFilter(_RAY_DATA_NOTICES)
    # Ray Data warns when a stage may run more actors or tasks at once than it has inputs (a tiny
    # corpus: one unit, one file to write); nothing is wrong then.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv or ["--demo"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.redact import install_log_redaction, redact_text

    secrets = _secret_values(args.storage_options)
    install_log_redaction(secrets)
    try:
        config = config_from_args(args)
    except ConfigError as exc:  # before Ray starts, the demo model is made or anything is written
        print(f"sam-annotate: error: {redact_text(str(exc), secrets)}", file=sys.stderr)
        return 2
    if config.demo:
        print(DEMO_NOTICE, file=sys.stderr, flush=True)

    from pipeline.retry import RetriesExhausted
    from pipeline.run import IncompleteRun, run
    from sam_core import CheckpointError

    try:
        summary = run(config, progress=not args.no_progress,
                      connect=lambda: init_ray(args.ray_address, verbose=args.verbose))
    except (CheckpointError, ValueError, FileNotFoundError, PermissionError, RetriesExhausted, IncompleteRun) as exc:
        from pipeline.redact import redact_text

        print(f"sam-annotate: error: {redact_text(str(exc), secrets)}", file=sys.stderr)
        return 1
    print(summary.line())
    if config.demo:
        print(DEMO_NOTICE, file=sys.stderr, flush=True)
    return 0


def _secret_values(storage_options: dict) -> List[str]:
    from pipeline.redact import secret_values

    return secret_values(storage_options)


if __name__ == "__main__":
    sys.exit(main())
