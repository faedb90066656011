"""`sam-annotate` arguments, and the no-argument demo that a new user runs first."""
import dataclasses

import pyarrow.parquet as pq
import pytest

from jobs import annotate as cli
from pipeline.config import AMG_FIELDS, AnnotateConfig, ConfigError, option_name
from pipeline.inputs.sources import iter_image_uris


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


# --- wrong values: one line naming the option, exit 2, before Ray starts or anything is written (issue 13) ---

def _never_start_ray(*args, **kwargs):
    raise AssertionError("Ray was started for a command that should have been refused")


BAD_VALUES = [
    ("--points-per-side", "0"), ("--points-per-batch", "0"), ("--pred-iou-thresh", "1.5"),
    ("--stability-score-thresh", "-0.1"), ("--stability-score-offset", "-1"), ("--box-nms-thresh", "2"),
    ("--crop-n-layers", "-1"), ("--crop-nms-thresh", "nan"), ("--crop-overlap-ratio", "1"),
    ("--crop-n-points-downscale-factor", "0"), ("--min-mask-region-area", "-5"), ("--batch-size", "0"),
    ("--rows-per-file", "0"), ("--unit-size", "0"), ("--num-actors", "0"), ("--gpus-per-actor", "1.5"), ("--limit", "0"),
    ("--max-pixels", "0"), ("--checkpoint-sha256", "not-a-digest"),
    # refused by the parser itself: the same one line
    ("--points-per-side", "abc"), ("--model-type", "vit_x"), ("--multimask", "sometimes"),
    ("--storage-options", "[1]"),
]


@pytest.mark.parametrize("option, value", BAD_VALUES)
def test_a_wrong_value_is_one_line_naming_its_option_and_nothing_is_written(option, value, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setattr(cli, "init_ray", _never_start_ray)
    monkeypatch.setattr(cli, "DEMO_CHECKPOINT", tmp_path / "demo.pth")
    output = tmp_path / "out"
    argv = ["--demo", "--output", str(output), option, value]
    try:
        code = cli.main(argv)
    except SystemExit as exit:  # argparse's own refusals exit from parse_args
        code = exit.code
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("sam-annotate: error: ") and option in lines[0], captured.err
    assert "Traceback" not in captured.err and "usage:" not in captured.err and captured.out == ""
    assert not output.exists() and not (tmp_path / "demo.pth").exists()


def test_several_wrong_values_are_named_together():
    with pytest.raises(ConfigError, match=r"^--points-per-side must be ≥ 1, got 0; --batch-size must be ≥ 1, got 0$"):
        parse("--input", "i", "--output", "o", "--checkpoint", "c", "--points-per-side", "0", "--batch-size", "0")


def test_every_numeric_field_is_checked_for_library_users_too():
    numeric = [f.name for f in dataclasses.fields(AnnotateConfig)
               if f.type in ("int", "float", "Optional[int]", "Optional[float]")]
    assert {"points_per_side", "crop_overlap_ratio", "batch_size", "num_actors", "gpus_per_actor", "limit",
            "max_pixels", *AMG_FIELDS} <= set(numeric)
    for name in numeric:
        for bad in (-1, float("nan"), "4"):
            with pytest.raises(ConfigError, match=option_name(name)):
                AnnotateConfig(input="i", output="o", checkpoint="c", **{name: bad}).validate()


def test_the_edges_of_every_range_are_accepted():
    edges = dict(points_per_side=1, points_per_batch=1, pred_iou_thresh=1.0, stability_score_thresh=0.0,
                 stability_score_offset=0.0, box_nms_thresh=1.0, crop_n_layers=0, crop_nms_thresh=0.0,
                 crop_overlap_ratio=0.0, crop_n_points_downscale_factor=1, min_mask_region_area=0, batch_size=1,
                 rows_per_file=1, unit_size=1, num_actors=1, gpus_per_actor=0.0, limit=1, max_pixels=1,
                 checkpoint_sha256="AB" * 32)
    config = AnnotateConfig(input="i", output="o", checkpoint="c", **edges)
    assert config.validate() is config
    AnnotateConfig(input="i", output="o", checkpoint="c", gpus_per_actor=1, crop_overlap_ratio=0.99).validate()


def test_every_crop_layer_needs_points():
    deep = dict(input="i", output="o", checkpoint="c", crop_n_layers=3, crop_n_points_downscale_factor=2)
    with pytest.raises(ConfigError, match=r"--points-per-side must be ≥ .*2\*\*3 = 8.*got 4"):
        AnnotateConfig(points_per_side=4, **deep).validate()
    AnnotateConfig(points_per_side=8, **deep).validate()


def test_a_library_config_without_its_uris_names_them():
    with pytest.raises(ConfigError, match="^--input, --checkpoint must be given$"):
        AnnotateConfig(input="", output="o", checkpoint="").validate()


# --- --help and --storage-options (issue 13) ---

def test_help_says_what_is_required_without_demo_and_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--input, --output and --checkpoint are required unless --demo is given" in text
    parser = cli.build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        if action.dest in ("input", "output", "checkpoint"):
            assert "required unless --demo" in action.help, action.dest
        assert "default" in action.help, f"{action.option_strings[0]} does not say its default"
        if action.default not in (None, False, {}, []):  # nothing: the help says "none"
            shown = f"{action.default:g}" if isinstance(action.default, float) else str(action.default)
            assert shown in action.help, f"{action.option_strings[0]} does not show its default {shown}"


@pytest.mark.parametrize("command", ["annotate", "export", "preview"])
@pytest.mark.parametrize("text, says", [('{"secret": "s3cr3t-value-123', "not valid JSON"),
                                        ('["s3cr3t-value-123"]', "must be a JSON object")])
def test_bad_storage_options_are_one_line_that_never_repeats_them(command, text, says, capsys):
    from jobs import export, preview

    main = {"annotate": cli.main, "export": export.main, "preview": preview.main}[command]
    argv = {"annotate": ["--input", "i", "--output", "o", "--checkpoint", "c"],
            "export": ["--input", "i", "--format", "coco", "--output", "o"],
            "preview": ["--input", "i", "--output", "o"]}[command]
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--storage-options", text])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert len(err.splitlines()) == 1 and "--storage-options" in err and says in err, err
    assert "s3cr3t-value-123" not in err and "usage:" not in err


# --- inputs and outputs that cannot be used: one line, exit 1, nothing written (issue 13) ----------

def _input_cases(tmp_path):
    (tmp_path / "no-images").mkdir()
    (tmp_path / "no-images" / "notes.md").write_text("text only")
    (tmp_path / "a-file").write_text("not a directory")
    return {
        "missing folder": (["--input", str(tmp_path / "nowhere")], "does not exist"),
        "glob matching nothing": (["--input", str(tmp_path / "*.jpg")], "matches nothing"),
        "missing manifest": (["--input", str(tmp_path / "inputs.txt")], "does not exist"),
        "folder without images": (["--input", str(tmp_path / "no-images")], "holds no image files"),
        "output that is a file": (["--output", str(tmp_path / "a-file")], "is a file"),
    }


@pytest.mark.parametrize("case", ["missing folder", "glob matching nothing", "missing manifest",
                                  "folder without images", "output that is a file"])
def test_an_unusable_input_or_output_is_one_line_and_nothing_is_written(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "init_ray", _never_start_ray)
    extra, says = _input_cases(tmp_path)[case]
    before = {p.name for p in tmp_path.iterdir()}
    argv = ["--demo", "--output", str(tmp_path / "out"), *extra, "--no-progress"]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("sam-annotate: error:")]
    assert len(errors) == 1 and says in errors[0], captured.err
    assert "Traceback" not in captured.err and "ok," not in captured.out
    assert {p.name for p in tmp_path.iterdir()} == before  # no output folder, no _SUCCESS, no _run.json


def test_a_run_that_failed_before_any_commit_does_not_lock_the_output(ray_session, tmp_path):
    """Only the settings of rows that exist bind a rerun: a failed first try must not refuse the fix."""
    from pipeline.run import run
    from tests.pipeline.faulty_stages import BrokenModelAnnotator
    from tests.pipeline.standin import StandInAnnotator

    failing = AnnotateConfig(input=str(cli.SAMPLES_DIR), output=str(tmp_path / "out"), checkpoint="unused",
                             points_per_side=4, num_actors=1)
    with pytest.raises(Exception, match="truncated download"):
        run(failing, progress=False, stage=(BrokenModelAnnotator, {"config": failing.to_dict()}))
    assert (tmp_path / "out" / "_run.json").exists()  # the failed run left its manifest

    fixed = AnnotateConfig(**{**failing.to_dict(), "points_per_side": 5})
    summary = run(fixed, progress=False, stage=(StandInAnnotator, {"config": fixed.to_dict()}))
    assert summary.ok == len(list(iter_image_uris(str(cli.SAMPLES_DIR))))
    # now rows exist, and they do bind
    with pytest.raises(ValueError, match="points_per_side"):
        run(AnnotateConfig(**{**fixed.to_dict(), "points_per_side": 6}), progress=False)


@pytest.mark.parametrize("failure", ["store down", "units left"])
def test_a_run_that_stops_on_the_store_or_leaves_units_is_one_line(failure, tmp_path, capsys, monkeypatch):
    from pipeline import run as run_module
    from pipeline.retry import RetriesExhausted

    def stopped(*args, **kwargs):
        if failure == "store down":
            raise RetriesExhausted("writing s3://b/out/_commits/x.json: failed 5 times over 7.5s; last error ...")
        raise run_module.IncompleteRun("1 unit(s) did not complete (ls-0123456789ab-0-8); rerun the same command")

    monkeypatch.setattr(run_module, "run", stopped)
    assert cli.main(["--demo", "--output", str(tmp_path / "out"), "--no-progress"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sam-annotate: error:")]
    assert len(errors) == 1 and ("failed 5 times" in errors[0] or "rerun the same command" in errors[0])


def test_the_sa1b_preset_sets_the_papers_parameters_and_given_options_win():
    from sam_core.amg.presets import preset_parameters

    config = parse("--input", "i", "--output", "o", "--checkpoint", "c", "--preset", "sa1b")
    assert config.preset == "sa1b" and config.amg_kwargs() == {**parse("--input", "i", "--output", "o",
                                                                       "--checkpoint", "c").amg_kwargs(),
                                                              **preset_parameters("sa1b")}
    assert (config.crop_n_layers, config.min_mask_region_area) == (2, 100)
    mine = parse("--input", "i", "--output", "o", "--checkpoint", "c", "--preset", "sa1b", "--crop-n-layers", "1")
    assert mine.crop_n_layers == 1 and mine.crop_n_points_downscale_factor == 2
