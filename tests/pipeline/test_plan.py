"""The Ray Data plan as a GPU cluster runs it: decode in CPU tasks, annotate in GPU actors.

The session's Ray has one logical GPU and no CUDA, so the annotator actor is scheduled on a
GPU and must fall back to the CPU by itself.
"""
import re

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import AnnotateConfig
from pipeline.run import build_dataset, configure_data_context, plan_actor_pool, run
from pipeline.inputs.units import plan_units
from tests.sam_factory import make_official_sam, real_photos, save_official_checkpoint

AMG = dict(points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


@pytest.mark.parametrize(
    "cluster, overrides, expected",
    [
        ({"CPU": 4, "GPU": 1}, {}, (1, 1.0)),
        ({"CPU": 64, "GPU": 8}, {}, (8, 1.0)),
        ({"CPU": 64, "GPU": 8}, {"gpus_per_actor": 0.5}, (16, 0.5)),
        ({"CPU": 2}, {}, (2, 0.0)),
        ({"CPU": 16, "GPU": 2}, {"num_actors": 1}, (1, 1.0)),
        ({"CPU": 16, "GPU": 2}, {"gpus_per_actor": 0}, (16, 0)),
    ],
)
def test_actor_pool_defaults_to_one_actor_per_gpu_else_per_cpu(cluster, overrides, expected):
    config = AnnotateConfig(input="i", output="o", checkpoint="c", **overrides)
    assert plan_actor_pool(config, cluster) == expected


def operator_names(stats: str) -> list:
    return re.findall(r"^Operator \d+ (.+?): ", stats, flags=re.MULTILINE)


def test_decode_and_annotate_are_separate_stages_and_the_gpu_actor_falls_back_to_cpu(ray_session, tmp_path):
    checkpoint = save_official_checkpoint(make_official_sam(seed=1), tmp_path / "tiny.pth")
    uris = []
    for index, photo in enumerate(real_photos()):
        uris.append(str(tmp_path / f"photo{index}.png"))
        Image.fromarray(photo).save(uris[-1])
    broken = tmp_path / "broken.jpg"
    broken.write_text("<html>not an image</html>")
    uris.append(str(broken))
    config = AnnotateConfig(input=str(tmp_path), output=str(tmp_path / "out"), checkpoint=str(checkpoint),
                            batch_size=2, **AMG)

    manifest = tmp_path / "inputs.txt"
    manifest.write_text("\n".join(uris) + "\n")
    planned = plan_units(str(manifest), {}, set(), unit_size=2, limit=None, output=None, run_index=1).units
    configure_data_context(progress=False)
    results = build_dataset(config, planned).materialize()

    names = operator_names(results.stats())
    assert "MapBatches(Annotator)" in names, names
    assert any("decode_batch" in name and "Annotator" not in name for name in names), names
    assert sorted(r["unit"] for r in results.take_all()) == sorted(u.id for u in planned)  # a file per unit
    rows = {row["uri"]: row for row in pq.read_table(str(tmp_path / "out")).to_pylist()}
    assert sorted(rows) == sorted(uris)
    for uri in uris[:3]:
        assert rows[uri]["status"] == "ok" and rows[uri]["num_masks"] > 0
        assert min(rows[uri][k] for k in ("read_s", "decode_s", "annotate_s")) >= 0
    assert rows[str(broken)]["status"] == "error" and rows[str(broken)]["error"]


def test_a_model_that_cannot_load_stops_the_run_before_any_row(ray_session, tmp_path):
    from sam_core import CheckpointError

    (tmp_path / "in").mkdir()
    Image.fromarray(real_photos()[2]).save(tmp_path / "in" / "a.png")
    config = AnnotateConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                            checkpoint=str(tmp_path / "missing.pth"))
    with pytest.raises(CheckpointError, match="missing.pth"):
        run(config, progress=False)
    assert not list((tmp_path / "out").glob("part-*")) and not (tmp_path / "out" / "_SUCCESS").exists()
