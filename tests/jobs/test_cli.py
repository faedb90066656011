"""`sam-annotate` arguments, and the no-argument demo that a new user runs first."""
import pyarrow.parquet as pq
import pytest

from jobs import annotate as cli
from pipeline.sources import iter_image_uris


def parse(*argv):
    return cli.config_from_args(cli.build_parser().parse_args(list(argv)))


def test_every_option_reaches_the_config():
    config = parse(
        "--input", "s3://b/in/", "--output", "s3://b/out/", "--checkpoint", "s3://b/m.pth",
        "--checkpoint-sha256", "ab" * 32, "--model-type", "vit_b", "--fast",
        "--points-per-side", "16", "--points-per-batch", "32", "--pred-iou-thresh", "0.5",
        "--stability-score-thresh", "0.6", "--stability-score-offset", "2", "--box-nms-thresh", "0.4",
        "--crop-n-layers", "1", "--crop-nms-thresh", "0.3", "--crop-overlap-ratio", "0.25",
        "--crop-n-points-downscale-factor", "2", "--min-mask-region-area", "100",
        "--num-actors", "3", "--gpus-per-actor", "0.5", "--batch-size", "8", "--rows-per-file", "50", "--unit-size", "64",
        "--storage-options", '{"anon": false, "client_kwargs": {"endpoint_url": "http://h:1"}}',
        "--overwrite", "--limit", "10", "--max-pixels", "1000",
    )
    assert (config.input, config.output, config.checkpoint) == ("s3://b/in/", "s3://b/out/", "s3://b/m.pth")
    assert (config.checkpoint_sha256, config.model_type, config.fast) == ("ab" * 32, "vit_b", True)
    assert config.amg_kwargs() == dict(
        points_per_side=16, points_per_batch=32, pred_iou_thresh=0.5, stability_score_thresh=0.6,
        stability_score_offset=2.0, box_nms_thresh=0.4, crop_n_layers=1, crop_nms_thresh=0.3,
        crop_overlap_ratio=0.25, crop_n_points_downscale_factor=2, min_mask_region_area=100,
    )
    assert (config.num_actors, config.gpus_per_actor, config.batch_size, config.rows_per_file) == (3, 0.5, 8, 50)
    assert config.unit_size == 64
    assert config.storage_options == {"anon": False, "client_kwargs": {"endpoint_url": "http://h:1"}}
    assert (config.overwrite, config.limit, config.max_pixels, config.demo) == (True, 10, 1000, False)


def test_defaults_are_segment_anythings():
    config = parse("--input", "i", "--output", "o", "--checkpoint", "c")
    assert (config.points_per_side, config.pred_iou_thresh, config.stability_score_thresh) == (32, 0.88, 0.95)
    assert (config.num_actors, config.gpus_per_actor) == (None, None)


def test_missing_required_arguments_name_them():
    with pytest.raises(SystemExit, match="--output, --checkpoint"):
        parse("--input", "i")


def test_secrets_in_storage_options_stay_out_of_the_public_config():
    config = parse("--input", "i", "--output", "o", "--checkpoint", "c",
                   "--storage-options", '{"key": "AKIAEXAMPLEKEY123456", "secret": "s3cr3t-value-123"}')
    public = str(config.to_public_dict())
    assert "s3cr3t-value-123" not in public and "AKIAEXAMPLEKEY123456" not in public


def test_an_unloadable_checkpoint_fails_with_the_loaders_message(ray_session, tmp_path, capsys):
    code = cli.main(["--input", str(cli.SAMPLES_DIR), "--output", str(tmp_path / "out"),
                     "--checkpoint", str(tmp_path / "nope.pth"), "--no-progress"])
    assert code == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_demo_annotates_the_bundled_samples_with_a_loud_notice(ray_session, tmp_path, capsys):
    output = tmp_path / "demo"
    assert cli.main(["--demo", "--output", str(output), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "RANDOM WEIGHTS" in captured.err and "MEANINGLESS" in captured.err
    samples = list(iter_image_uris(str(cli.SAMPLES_DIR)))
    assert len(samples) >= 3
    assert f"{len(samples)} ok, 0 failed" in captured.out
    table = pq.read_table(output)
    assert sorted(table.column("uri").to_pylist()) == samples
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert (output / "_SUCCESS").exists()


def test_the_kuberay_entrypoint_and_runtime_env_are_valid():
    import shlex

    import yaml

    rayjob = yaml.safe_load((cli.SAMPLES_DIR.parent / "k8s" / "rayjob.yaml").read_text())
    assert rayjob["kind"] == "RayJob"
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.annotate"]
    config = cli.config_from_args(cli.build_parser().parse_args(argv[3:]))
    assert config.input.startswith("s3://") and config.checkpoint.endswith(".pth")
    runtime_env = yaml.safe_load((cli.SAMPLES_DIR.parent / "runtime_env.yaml").read_text())
    assert runtime_env["env_vars"]["OMP_NUM_THREADS"] == "1"
