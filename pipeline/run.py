"""The Ray Data job: list -> read -> decode (CPU tasks) -> annotate (actor pool) -> Parquet.

``run(config)`` is the whole job; ``build_dataset`` is its plan. Shards are written by the
driver as batches stream out of ``iter_batches``, so nothing is materialised, the progress bar
counts rows as they land, and resume only needs the URIs already in the output (see README:
an anti-join on written URIs rather than Ray Data's CheckpointConfig, which needs a spare CPU
slot and hung at num_cpus=2).
"""
from __future__ import annotations

import itertools
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema, sources
from pipeline.annotate import Annotator, check_model
from pipeline.config import RESULT_FIELDS, AnnotateConfig
from pipeline.decode import decode_batch
from pipeline.read import read_batch
from pipeline.redact import redact_text
from pipeline.sink import Output, ShardWriter

log = logging.getLogger(__name__)

# Largest block of the URI list: small, so that reading and decoding start streaming at once.
MAX_URIS_PER_BLOCK = 64


@dataclass
class RunSummary:
    output: str
    run_index: int
    listed: int
    already_written: int
    ok: int = 0
    failed: int = 0
    masks: int = 0
    seconds: float = 0.0

    @property
    def processed(self) -> int:
        return self.ok + self.failed

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"sam-annotate: {self.ok} ok, {self.failed} failed, {self.masks} masks, "
            f"{self.images_per_s:.2f} img/s over {self.seconds:.1f}s "
            f"({self.already_written} already written of {self.listed} listed) -> {redact_text(self.output)}"
        )


def annotate_stage(config: AnnotateConfig) -> Tuple[type, dict]:
    """The actor class for the annotate stage and its constructor kwargs: the one place to choose it."""
    if config.prompts:
        from pipeline.prompted import annotate_stage as prompted_stage

        return prompted_stage(config)
    return Annotator, {"config": config.to_dict()}


def plan_actor_pool(config: AnnotateConfig, cluster: dict) -> Tuple[int, float]:
    """(number of actors, GPUs per actor) from the config and ``ray.cluster_resources()``.

    Default: one actor per GPU when the cluster has GPUs (reading and decoding then run as
    CPU tasks); otherwise one CPU actor per CPU: with equal resources Ray fuses read and decode
    into the actors, so each actor decodes its own images and no CPU is left idle.
    """
    gpus = float(cluster.get("GPU", 0))
    cpus = int(cluster.get("CPU", 1))
    gpus_per_actor = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if config.num_actors is not None:
        return config.num_actors, gpus_per_actor
    if gpus_per_actor > 0:
        return max(1, int(gpus // gpus_per_actor)), gpus_per_actor
    return max(1, cpus), gpus_per_actor


def uris_per_block(num_uris: int, num_actors: int) -> int:
    """Enough blocks to keep every actor fed (about 4 each) even on a small corpus."""
    return max(1, min(MAX_URIS_PER_BLOCK, -(-num_uris // (4 * max(1, num_actors)))))


def build_dataset(config: AnnotateConfig, uris: List[str], stage: Optional[Tuple[type, dict]] = None):
    """The Ray Data plan; lazy until iterated. `stage` overrides `annotate_stage(config)`."""
    import ray

    num_actors, gpus_per_actor = plan_actor_pool(config, ray.cluster_resources())
    actor_class, actor_kwargs = stage or annotate_stage(config)
    per_block = uris_per_block(len(uris), num_actors)
    blocks = [pa.table({"uri": uris[i: i + per_block]}) for i in range(0, len(uris), per_block)]
    if config.prompts:  # each image's prompts travel next to its uri, through read and decode
        from pipeline.prompted import with_prompts

        blocks = [with_prompts(block, config) for block in blocks]
    return (
        ray.data.from_arrow(blocks)
        .map_batches(read_batch, fn_kwargs={"storage_options": config.storage_options}, batch_format="numpy")
        .map_batches(decode_batch, fn_kwargs={"max_pixels": config.max_pixels}, batch_format="numpy")
        .map_batches(
            actor_class,
            fn_constructor_kwargs=actor_kwargs,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            **({"num_gpus": gpus_per_actor} if gpus_per_actor > 0 else {"num_cpus": 1}),
            batch_size=config.batch_size,
            batch_format="numpy",
        )
    )


def run(
    config: AnnotateConfig,
    *,
    progress: bool = True,
    stage: Optional[Tuple[type, dict]] = None,
    connect: Optional[Callable[[], None]] = None,
    on_rows: Optional[Callable[[pa.Table], None]] = None,
) -> RunSummary:
    """Annotate every input of ``config`` that has no row in the output yet.

    `stage` replaces the annotate stage's (actor class, constructor kwargs); None picks it
    from the config (`annotate_stage`). `connect` starts or joins Ray, and is called only when
    there is work: a rerun of a completed output never waits for Ray to start. `on_rows` is
    called with each table of rows once it is handed to the shard writer (monitoring, benches).
    """
    started, clock = _now(), time.perf_counter()
    output = Output(config.output, config.storage_options)
    if not config.overwrite:
        _check_same_settings(output, config)
    listed = sources.list_inputs(config.input, config.storage_options, config.limit)
    written = set() if config.overwrite else output.written_uris()
    todo = sources.pending(listed, written)
    prompt_errors: List[dict] = []
    if config.prompts:  # only prompted images; prompts for images not listed become error rows
        from pipeline.prompted import load_prompts, select_inputs

        todo, prompt_errors = select_inputs(config, listed, written)
        listed = list(load_prompts(config))
    # The model is checked before any side effect: a bad checkpoint never wipes (--overwrite)
    # or touches an existing output.
    checkpoint_sha256 = check_model(config) if (todo or prompt_errors) and stage is None else None
    if config.overwrite:
        output.clear()
    summary = RunSummary(config.output, output.next_run_index(), len(listed),
                         len(listed) - len(todo) - len(prompt_errors))
    manifest = _manifest(config, summary, started, checkpoint_sha256=checkpoint_sha256, status="running")
    if todo or prompt_errors:
        output.mark_incomplete()
        output.write_manifest(manifest)
        try:
            if connect is not None:
                connect()
            if progress:  # ours counts rows as they are written; read before the Dataset exists
                import ray

                ray.data.DataContext.get_current().enable_progress_bars = False
            dataset = build_dataset(config, todo, stage) if todo else None
            _write_rows(dataset, output, summary, config, progress, prompt_errors, on_rows)
        except BaseException as exc:
            summary.seconds = time.perf_counter() - clock
            output.write_manifest(_finish(manifest, summary, "failed", error=f"{type(exc).__name__}: {exc}"))
            raise
    else:
        manifest["checkpoint_sha256"] = (output.read_manifest() or {}).get("checkpoint_sha256")
    summary.seconds = time.perf_counter() - clock
    final = _finish(manifest, summary, "complete")
    output.write_manifest(final)
    output.mark_complete(final)
    return summary


def _write_rows(dataset, output: Output, summary: RunSummary, config: AnnotateConfig, progress: bool,
                first_rows: Sequence[dict] = (), on_rows: Optional[Callable[[pa.Table], None]] = None) -> None:
    row_schema = schema.OUTPUT_SCHEMA
    if config.prompts:
        from pipeline.prompted import PROMPTED_OUTPUT_SCHEMA as row_schema
    writer = ShardWriter(output, summary.run_index, row_schema, config.rows_per_shard)
    bar = _progress_bar(summary.listed - summary.already_written, progress)
    tables = [] if dataset is None else dataset.iter_batches(batch_size=None, batch_format="pyarrow")
    if first_rows:
        tables = itertools.chain([schema.rows_to_table(first_rows, row_schema)], tables)
    try:
        for table in tables:
            writer.write(table)
            ok = pc.sum(pc.equal(table["status"], schema.STATUS_OK)).as_py() or 0
            summary.ok += ok
            summary.failed += table.num_rows - ok
            summary.masks += pc.sum(table["num_masks"]).as_py() or 0
            bar.set_postfix(ok=summary.ok, failed=summary.failed, masks=summary.masks, refresh=False)
            bar.update(table.num_rows)
            if on_rows is not None:
                on_rows(table)
    finally:  # rows already received are kept even when the run stops: a rerun skips them
        bar.close()
        writer.close()


def _progress_bar(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is declared, but a bare cluster image may lack it: log lines instead
        return _LogProgress(total, enabled)
    return tqdm(total=total, unit="img", desc="annotating", disable=not enabled, file=sys.stderr)


class _LogProgress:
    """The few tqdm methods `_write_rows` uses, as a log line per update."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.postfix = total, enabled, 0, {}

    def update(self, rows: int) -> None:
        self.done += rows
        if self.enabled:
            log.info("annotating: %d/%d images %s", self.done, self.total, self.postfix)

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = values

    def close(self) -> None:
        pass


def _check_same_settings(output: Output, config: AnnotateConfig) -> None:
    """Refuse to extend an output made with other model/AMG settings: rows would disagree."""
    previous = (output.read_manifest() or {}).get("config")
    if not previous:
        return
    current = config.to_public_dict()
    changed = {k: (previous[k], current[k]) for k in RESULT_FIELDS if k in previous and previous[k] != current[k]}
    if changed:
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"output {redact_text(config.output)} was written with other settings ({details}); "
            "use --overwrite to start clean, or another --output"
        )


def _manifest(config: AnnotateConfig, summary: RunSummary, started: str, checkpoint_sha256, status: str) -> dict:
    return {
        "run_index": summary.run_index,
        "status": status,
        "config": config.to_public_dict(),
        "checkpoint": redact_text(config.checkpoint),
        "checkpoint_sha256": checkpoint_sha256,
        "versions": _versions(),
        "start_time": started,
        "end_time": None,
        "counts": {},
        "totals": {},
    }


def _finish(manifest: dict, summary: RunSummary, status: str, error: Optional[str] = None) -> dict:
    counts = {k: v for k, v in asdict(summary).items() if k not in ("output", "run_index")}
    counts["images_per_s"] = round(summary.images_per_s, 3)
    return {
        **manifest,
        "status": status,
        "error": redact_text(error),
        "end_time": _now(),
        "counts": counts,
        "totals": {"rows": summary.already_written + summary.processed},
    }


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("sam-annotate", "torch", "ray", "pyarrow", "numpy", "pillow", "pycocotools", "fsspec", "s3fs"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
