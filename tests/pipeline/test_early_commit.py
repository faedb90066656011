"""Progress is durable early: the first units of a run are small, and their rows are written and
committed as soon as they are annotated, not when ``rows_per_file`` rows have piled up.

Measured by order and counts (what the driver had received when the first commit record
appeared), never by time.
"""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import AnnotateConfig
from pipeline.inputs.read import read_units
from pipeline.inputs.units import FLUSH_UNIT, KIND_PARQUET, Unit
from pipeline.output import schema
from pipeline.output.sink import DATA_FILE, write_parts
from pipeline.run import run
from tests.pipeline.standin import StandInAnnotator
from tests.pipeline.test_faults import read_rows, write_images


def test_the_first_unit_is_committed_and_readable_while_the_rest_is_still_to_do(ray_session, tmp_path):
    inputs = write_images(tmp_path / "images", 48)
    out = tmp_path / "out"
    # rows_per_file (256) is more than the whole input: before, nothing was written until the end.
    config = AnnotateConfig(input=str(tmp_path / "images"), output=str(out), checkpoint="unused-by-stand-in",
                            num_actors=1, batch_size=2, unit_size=32)
    seen = {"rows": 0, "first_commit": None}

    def on_write(results: pa.Table) -> None:
        seen["rows"] += sum(results.column("rows").to_pylist())
        records = sorted((out / "_commits").glob("*.json"))
        if records and seen["first_commit"] is None:
            record = json.loads(records[0].read_text())
            # Readable now, while the run goes on: the rows the commit record names.
            rows = [row for name in record["files"] for row in pq.read_table(out / name).to_pylist()]
            seen["first_commit"] = {"written": seen["rows"], "commits": len(records), "record": record,
                                    "uris": sorted(row["uri"] for row in rows)}

    summary = run(config, progress=False, stage=(StandInAnnotator, {"config": config.to_dict()}), on_write=on_write)
    first = seen["first_commit"]
    assert first is not None
    # Units [0, 16) (the ramp), [16, 32) and [32, 48) (the grid): the first was committed when only its own 16
    # rows had reached the driver, with the other two units still to do.
    assert summary.units_planned == 3 and first["commits"] == 1 and first["written"] == 16
    assert (first["record"]["start"], first["record"]["stop"], first["record"]["rows"]) == (0, 16, 16)
    assert first["uris"] == sorted(inputs)[:16]
    # Everything once in the end; the flush rows left no row and no file of their own.
    assert sorted(row["uri"] for row in read_rows(out)) == sorted(inputs)
    assert summary.ok == len(inputs) and summary.units_committed == 3
    assert all(DATA_FILE.match(p.name)["unit"] != FLUSH_UNIT for p in out.glob("part-*"))


def test_a_ramp_unit_is_followed_by_flush_rows_that_the_writer_drops(tmp_path):
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"uri": [str(tmp_path / f"{i}.jpg") for i in range(3)]}), manifest)
    ramp = Unit(KIND_PARQUET, str(manifest), str(manifest), 0, 3, size=3, flush=True)
    grid = Unit(KIND_PARQUET, str(manifest), str(manifest), 0, 3, size=3)

    def read(unit):
        batch = {name: np.array([value]) for name, value in unit.to_row().items() if name != "entries"}
        batch["entries"] = np.array([[]], dtype=object)
        return list(read_units(batch, flush_rows=5))

    items, flush = read(ramp)
    assert list(items["unit"]) == [ramp.id] * 3 and not items["skip"].any()
    assert list(flush["unit"]) == [FLUSH_UNIT] * 5 and flush["skip"].all() and set(flush) == set(items)
    assert len(read(grid)) == 1  # a unit on the grid gets none

    rows = [schema.skip_row("") for _ in range(5)] + [schema.skip_row("a")]
    table = schema.rows_to_table(rows).append_column("unit", pa.array([FLUSH_UNIT] * 5 + [ramp.id]))
    table = table.append_column("unit_index", pa.array([0, 1, 2, 3, 4, 0], pa.int64()))
    table = table.append_column("unit_last", pa.array([False] * 5 + [True]))
    results = write_parts(table, output=str(tmp_path / "out"), storage_options=None, row_schema=schema.OUTPUT_SCHEMA)
    assert results.column("unit").to_pylist() == [ramp.id]  # the flush rows are no unit's: not reported
    assert not Path(tmp_path / "out").exists() or not list(Path(tmp_path / "out").glob("part-*"))
