"""The job: units -> read -> decode (CPU tasks) -> annotate (actor pool) -> write (workers) -> commit.

``run(config)`` is the whole job and ``build_dataset`` its Ray Data plan. The driver plans the
units of work (``pipeline.inputs.units``), builds the plan, and consumes only the small write results
the workers return (``pipeline.output.sink.write_parts``): it commits each unit once all of its items
are written, and feeds the progress bar. It never holds the input list, the output rows, or the
set of done images: resume is one listing of the commit records.
"""
from __future__ import annotations

import logging
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable, List, Optional, Tuple

import pyarrow as pa

from pipeline.inputs import units as units_of_work
from pipeline.modes.stage import check_model
from pipeline.config import RESULT_FIELDS, AnnotateConfig
from pipeline.inputs.decode import decode_batch
from pipeline.modes import Mode, mode_for
from pipeline.inputs.read import read_units
from pipeline.redact import redact_text
from pipeline.output.schema import with_sidecars
from pipeline.output.sink import LAYOUT, Committer, Output, write_parts
from pipeline.inputs.units import Unit

log = logging.getLogger(__name__)


class IncompleteRun(RuntimeError):
    """The plan ran out but some units were not committed; a rerun redoes them."""


@dataclass
class RunSummary:
    output: str
    run_index: int
    units_planned: int
    units_done_before: int
    units_committed: int = 0
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
            f"({self.units_committed} of {self.units_planned} units committed, "
            f"{self.units_done_before} done before) -> {redact_text(self.output)}"
        )


def plan_actor_pool(config: AnnotateConfig, cluster: dict) -> Tuple[int, float]:
    """(number of actors, GPUs per actor) from the config and ``ray.cluster_resources()``.

    Default: one actor per GPU when the cluster has GPUs (reading and decoding then run as
    CPU tasks); otherwise one CPU actor per CPU, and reading and decoding run beside them.
    """
    gpus = float(cluster.get("GPU", 0))
    cpus = int(cluster.get("CPU", 1))
    gpus_per_actor = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if config.num_actors is not None:
        return config.num_actors, gpus_per_actor
    if gpus_per_actor > 0:
        return max(1, int(gpus // gpus_per_actor)), gpus_per_actor
    return max(1, cpus), gpus_per_actor


def first_unit_items(config: AnnotateConfig) -> int:
    """Items in a run's first unit: ``RAMP_FIRST``, or one annotate batch if that is more.

    The units after it double up to ``unit_size`` (``pipeline.inputs.units.Ramp``), so that the
    first commit comes after a few images, not a whole unit.
    """
    return max(units_of_work.RAMP_FIRST, config.batch_size)


def build_dataset(config: AnnotateConfig, planned: List[Unit], mode: Optional[Mode] = None,
                  stage: Optional[Tuple[type, dict]] = None):
    """The Ray Data plan; lazy until iterated. Its rows are the write results, one per file.

    `stage` overrides the mode's (actor class, constructor kwargs). Call after the DataContext
    is set (``configure_data_context``).
    """
    import ray

    mode = mode or mode_for(config)
    num_actors, gpus_per_actor = plan_actor_pool(config, ray.cluster_resources())
    actor_class, actor_kwargs = stage or mode.stage(config)
    options = config.storage_options
    # CPU actors hold every core. Reading and decoding, light beside AMG on a CPU, then run as
    # tasks without a CPU of their own, a few at a time: were they fused into the actors, each
    # actor task would take whole units, and rows would reach the writer only unit by unit.
    cpu_stages = {} if gpus_per_actor > 0 else {"num_cpus": 0,
                                                "compute": ray.data.TaskPoolStrategy(size=max(2, num_actors))}
    return (
        ray.data.from_items([unit.to_row() for unit in planned], override_num_blocks=len(planned))
        .map_batches(read_units, fn_kwargs={"storage_options": options, "select": mode.selector(config),
                                            "sidecars": config.sidecars, "image_column": config.image_column,
                                            "id_column": config.id_column, "flush_rows": config.rows_per_file},
                     batch_size=1, batch_format="numpy", **cpu_stages)
        .map_batches(decode_batch, fn_kwargs={"max_pixels": config.max_pixels}, batch_format="numpy",
                     **cpu_stages)
        .map_batches(
            actor_class,
            fn_constructor_kwargs=actor_kwargs,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            **({"num_gpus": gpus_per_actor} if gpus_per_actor > 0 else {"num_cpus": 1}),
            batch_size=config.batch_size,
            batch_format="numpy",
        )
        # Writing is I/O: no CPU reserved, so that CPU actors holding every core cannot starve it.
        # Ray Data gives this stage a task only once `rows_per_file` rows wait for it (its
        # `batch_size` is also its bundler's minimum; the rest only at the end of the input), so a
        # unit smaller than that would be written, and committed, only with later units' rows, or
        # at the very end of a short run. A ramp unit (`Unit.flush`) is therefore followed by
        # `rows_per_file` flush rows from the read stage: skipped rows of no unit that fill the
        # bundle and travel through decode and the actors as cheap skips, and that `write_parts`
        # drops. The first units' rows reach storage as soon as they are annotated, and files keep
        # `rows_per_file` rows after the ramp. The price: `rows_per_file` skip rows through the
        # actors per ramp unit (6 of them from 16 to 1,024 items), and the ramp's files are as
        # small as its units.
        # Smaller batches here would make every file small; a write per unit end has no hook in
        # Ray Data's public API (its bundler counts rows only); a separate plan for the first
        # units would load the model twice.
        .map_batches(write_parts, fn_kwargs={"output": config.output, "storage_options": options,
                                             "row_schema": with_sidecars(mode.row_schema, config.sidecars)},
                     batch_size=config.rows_per_file, batch_format="pyarrow", num_cpus=0,
                     compute=ray.data.TaskPoolStrategy(size=max(2, num_actors)))
    )


def configure_data_context(progress: bool) -> None:
    """Ray Data settings; they must be set before the Dataset is created."""
    import ray

    context = ray.data.DataContext.get_current()
    # Rows reach the writer in unit order, so a unit's rows land in few files.
    context.execution_options.preserve_order = True
    if progress:  # ours counts rows as they are written
        context.enable_progress_bars = False


def run(
    config: AnnotateConfig,
    *,
    progress: bool = True,
    stage: Optional[Tuple[type, dict]] = None,
    connect: Optional[Callable[[], None]] = None,
    on_write: Optional[Callable[[pa.Table], None]] = None,
) -> RunSummary:
    """Annotate every unit of ``config``'s input that the output has not committed yet.

    `stage` replaces the annotate stage's (actor class, constructor kwargs); None takes the
    mode's. `connect` starts or joins Ray, and is called only when there is work: a rerun of a
    completed output never waits for Ray to start. `on_write` is called with each table of
    write results (``pipeline.output.sink.WRITE_RESULT_SCHEMA``) as it reaches the driver.
    """
    config.validate()
    started, clock = _now(), time.perf_counter()
    mode = mode_for(config)
    output = Output(config.output, config.storage_options)
    output.check_usable(overwrite=config.overwrite)
    committed = set() if config.overwrite else output.committed_units()
    if committed:
        _check_same_settings(output, config)
    mode.prepare(config)
    run_index = 1 if config.overwrite else output.next_run_index()
    with tempfile.TemporaryDirectory(prefix="sam-annotate-plan-") as staging:
        plan = units_of_work.plan_units(
            config.input, config.storage_options, committed, unit_size=config.unit_size, limit=config.limit,
            output=output, run_index=run_index, staging_dir=staging, fresh_output=config.overwrite,
            image_column=config.image_column, ramp_from=first_unit_items(config))
        # The model is checked before any side effect: a bad checkpoint never wipes (--overwrite)
        # or touches an existing output.
        checkpoint_sha256 = check_model(config) if plan.units and stage is None else None
        if config.overwrite:
            output.clear()
        elif plan.units:
            output.remove_uncommitted(committed)
        # After the clean-up, since a mode may write files of its own (prompted mode: its table
        # sorted by image).
        extra = mode.extra_units(config, plan, committed, output)
        if extra and not plan.units:  # only the mode's own units are left to do
            checkpoint_sha256 = check_model(config) if stage is None else None
            output.remove_uncommitted(committed)
        plan.units += extra
        summary = RunSummary(config.output, run_index, len(plan.units), len(committed))
        manifest = _manifest(config, summary, started, checkpoint_sha256=checkpoint_sha256, status="running")
        if plan.units:
            output.mark_incomplete()
            output.write_manifest(manifest)  # before the snapshot: its run index is then taken
            if plan.snapshot_name:
                output.publish_listing(plan.snapshot_local_path, plan.snapshot_name)
            try:
                if connect is not None:
                    connect()
                configure_data_context(progress)
                committer = Committer(output, plan.units, run_index)
                _consume(build_dataset(config, plan.units, mode, stage), committer, summary, progress,
                         plan.known_items, on_write)
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


def _consume(dataset, committer: Committer, summary: RunSummary, progress: bool, total: Optional[int],
             on_write: Optional[Callable[[pa.Table], None]]) -> None:
    """Stream the write results: commit units as they complete, count rows, draw progress."""
    bar = _progress_bar(total, progress)
    try:
        # No prefetch: with it, a write result reaches the driver only once the next one exists, so
        # each commit waited for the next file to be written (the first, for the end of a short run).
        for results in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            tally = committer.add(results)
            summary.ok += tally.ok
            summary.failed += tally.failed
            summary.masks += tally.masks
            summary.units_committed += len(tally.committed)
            bar.set_postfix(ok=summary.ok, failed=summary.failed, masks=summary.masks,
                            units=f"{summary.units_committed}/{summary.units_planned}", refresh=False)
            bar.update(tally.rows)
            if on_write is not None:
                on_write(results)
    finally:
        bar.close()
    if committer.pending:
        names = ", ".join(sorted(committer.pending)[:3]) + (", ..." if len(committer.pending) > 3 else "")
        raise IncompleteRun(f"{len(committer.pending)} unit(s) did not complete ({names}); "
                            "rerun the same command to redo them")


def _progress_bar(total: Optional[int], enabled: bool):
    """tqdm on a terminal; elsewhere (pipes, `ray job logs`, CI) a log line now and then."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is declared, but a bare cluster image may lack it
        tqdm = None
    if tqdm is None or not sys.stderr.isatty():
        return _LogProgress(total, enabled)
    return tqdm(total=total, unit="img", desc="annotating", disable=not enabled, file=sys.stderr)


class _LogProgress:
    """The few tqdm methods `_consume` uses, as a log line at most every ``every_s`` seconds."""

    def __init__(self, total: Optional[int], enabled: bool, every_s: float = 30.0):
        self.total, self.enabled, self.done, self.postfix = total, enabled, 0, {}
        self.every_s, self.last_s = every_s, time.monotonic()

    def update(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if self.enabled and (now - self.last_s >= self.every_s or self.done == self.total):
            self.last_s = now
            log.info("annotating: %d/%s images %s", self.done, self.total or "?",
                     " ".join(f"{k}={v}" for k, v in self.postfix.items()))

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
        "layout": LAYOUT,
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
        "totals": {"units_committed": summary.units_done_before + summary.units_committed},
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
