"""load_sam: formats, sources, architecture inference, overrides, and clear errors for bad files."""
import hashlib
import json
import shutil

import pytest
import torch

from sam_core import CheckpointError, SamConfig, build_sam, load_sam
from sam_core.config import SamVisionConfig
from sam_core.infer_config import config_from_official_state_dict
from tests.sam_factory import make_official_sam, save_official_checkpoint, tiny_config


@pytest.fixture(scope="module")
def reference():
    return make_official_sam(seed=2)


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    return save_official_checkpoint(reference, tmp_path_factory.mktemp("ckpt") / "tiny.pth")


def _assert_same_weights(model, state_dict):
    ours = model.state_dict()
    assert set(ours) == set(state_dict)
    for key, value in state_dict.items():
        assert torch.equal(ours[key].float(), value.float()), key


def _resolved(config):
    """Config dict with mlp_dim resolved: ``None`` and ``4 * hidden_size`` mean the same model."""
    d = config.to_dict()
    d["vision_config"]["mlp_dim"] = config.vision_config.resolved_mlp_dim
    return d


# ---------------------------------------------------------------- formats and sources


def test_official_pth_by_path_and_file_url(reference, checkpoint):
    for source in (str(checkpoint), checkpoint, checkpoint.resolve().as_uri()):
        model = load_sam(source)
        _assert_same_weights(model, reference.state_dict())
        assert not model.training and model.device == torch.device("cpu") and model.dtype == torch.float32


def test_legacy_pickle_format_and_wrapped_state_dict(reference, tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save(reference.state_dict(), legacy, _use_new_zipfile_serialization=False)
    _assert_same_weights(load_sam(legacy), reference.state_dict())
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": reference.state_dict()}, wrapped)
    _assert_same_weights(load_sam(wrapped), reference.state_dict())


def test_fp16_checkpoint_loads_as_fp32(reference, tmp_path):
    half = tmp_path / "half.pth"
    torch.save({k: v.half() for k, v in reference.state_dict().items()}, half)
    model = load_sam(half)
    assert model.dtype == torch.float32
    assert torch.equal(model.image_encoder.pos_embed, reference.image_encoder.pos_embed.half().float())


def test_meta_named_safetensors_without_config(reference, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    _assert_same_weights(load_sam(path), reference.state_dict())


def test_hf_directory_and_file_next_to_config(reference, tmp_path):
    from sam_core.hf_format import save_hf_pretrained

    directory = tmp_path / "hf"
    save_hf_pretrained(reference, tiny_config(), str(directory))
    for source in (directory, directory / "model.safetensors", directory.resolve().as_uri()):
        model = load_sam(str(source))
        assert _resolved(model.config) == _resolved(tiny_config())
        _assert_same_weights(model, reference.state_dict())
        assert model.checkpoint_sha256 == hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def test_sha256_verified_before_use(checkpoint):
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert load_sam(checkpoint, expected_sha256=digest.upper()).checkpoint_sha256 == digest
    assert load_sam(checkpoint).checkpoint_sha256 == digest  # recorded even when not checked
    with pytest.raises(CheckpointError, match=f"sha256 mismatch.*expected {'0' * 64}, got {digest}"):
        load_sam(checkpoint, expected_sha256="0" * 64)


def test_dtype_names(checkpoint):
    assert load_sam(checkpoint, dtype="bf16").dtype == torch.bfloat16
    assert load_sam(checkpoint, dtype=torch.float16).mask_decoder.iou_token.weight.dtype == torch.float16
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        load_sam(checkpoint, dtype="int8")


# ---------------------------------------------------------------- architecture inference


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_published_architectures_are_inferred_from_shapes(name):
    expected = SamConfig.preset(name)
    with torch.device("meta"):  # shapes only: no memory for the 2.5 GB ViT-H
        state_dict = build_sam(expected).state_dict()
    assert config_from_official_state_dict(state_dict) == expected


def test_pruned_and_unusual_sizes_are_inferred(tmp_path):
    """SlimSAM-style pruned MLP width, no abs pos, windows of 5, two global layers, no qkv bias."""
    base = tiny_config()
    vision = SamVisionConfig(**{**base.vision_config.to_dict(), "mlp_dim": 52, "use_abs_pos": False,
                                "window_size": 5, "num_hidden_layers": 3, "global_attn_indexes": (0, 2),
                                "num_attention_heads": 4, "qkv_bias": False})
    config = SamConfig(vision, base.prompt_encoder_config, base.mask_decoder_config)
    path = tmp_path / "slim.pth"
    torch.save(build_sam(config).state_dict(), path)
    assert load_sam(path).config == config


def test_model_type_overrides_inference(checkpoint):
    with pytest.raises(CheckpointError, match=r"does not fit the SAM architecture \(width 768.*mis-shaped"):
        load_sam(checkpoint, model_type="vit_b")
    model = load_sam(checkpoint, model_type=tiny_config())
    assert model.config == tiny_config()
    with pytest.raises(CheckpointError, match="unknown model_type"):
        load_sam(checkpoint, model_type="vit_x")


# ---------------------------------------------------------------- bad files: clear errors


def test_truncated_downloads(checkpoint, tmp_path):
    data = checkpoint.read_bytes()
    for cut in (100, len(data) // 2, len(data) - 30):
        partial = tmp_path / f"partial_{cut}.pth"
        partial.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            load_sam(partial)


def test_truncated_safetensors(reference, tmp_path):
    from safetensors.torch import save_file

    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(full))
    partial = tmp_path / "partial.safetensors"
    partial.write_bytes(full.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="damaged or truncated safetensors"):
        load_sam(partial)


def test_another_models_weights(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    resnet = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(resnet, path)
    with pytest.raises(CheckpointError, match=r"not a SAM checkpoint.*'image_encoder.patch_embed.proj.weight'.*'bn1"):
        load_sam(path)
    as_safetensors = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet.items()}, str(as_safetensors))
    with pytest.raises(CheckpointError, match=r"not a SAM checkpoint.*'bn1"):
        load_sam(as_safetensors)


@pytest.mark.parametrize("content, match", [
    (b"\x89PNG\r\n\x1a\n" + bytes(64), r"not a checkpoint: it starts with b'\\x89PNG"),
    (b"<html><body>403 Forbidden</body></html>", "not a checkpoint: it starts with b'<html><b'"),
    (b"", "not a checkpoint"),
])
def test_non_checkpoints(tmp_path, content, match):
    path = tmp_path / "download.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_sam(path)


def test_missing_unexpected_and_misshaped_keys_are_named(reference, tmp_path):
    state_dict = dict(reference.state_dict())
    del state_dict["mask_decoder.iou_token.weight"]
    state_dict["mask_decoder.extra.weight"] = torch.zeros(1)
    state_dict["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 32)  # fine
    state_dict["mask_decoder.mask_tokens.weight"] = torch.zeros(4, 33)
    path = tmp_path / "edited.pth"
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError) as error:
        load_sam(path, model_type=tiny_config())
    message = str(error.value)
    assert "1 missing: 'mask_decoder.iou_token.weight'" in message
    assert "1 unexpected: 'mask_decoder.extra.weight'" in message
    assert "mask_decoder.mask_tokens.weight has (4, 33), expected (4, 32)" in message


def test_non_tensor_entries_and_non_dicts(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_sam(path)


def test_missing_sources(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_sam(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="without model.safetensors"):
        load_sam(tmp_path)
    with pytest.raises(CheckpointError, match="cannot open checkpoint"):
        load_sam("nosuchprotocol://bucket/x.pth")


def test_credentials_in_urls_are_not_echoed():
    with pytest.raises(CheckpointError) as error:
        load_sam("file://user:hunter2@/nonexistent/sam.pth?token=abc")
    assert "hunter2" not in str(error.value) and "abc" not in str(error.value)


@pytest.fixture
def hf_dir(reference, tmp_path):
    from sam_core.hf_format import save_hf_pretrained

    directory = tmp_path / "hf"
    save_hf_pretrained(reference, tiny_config(), str(directory))
    return directory


def _edit_config(directory, edit):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_hf_config_that_does_not_fit_the_weights(hf_dir):
    _edit_config(hf_dir, lambda c: c["vision_config"].update(hidden_size=64, num_attention_heads=2))
    with pytest.raises(CheckpointError, match=r"width 64.*image_encoder.patch_embed.proj.weight has \(32, 3, 16, 16\), "
                                              r"expected \(64, 3, 16, 16\)"):
        load_sam(hf_dir)


def test_hf_config_of_another_model(hf_dir):
    _edit_config(hf_dir, lambda c: c.update(model_type="clip"))
    with pytest.raises(CheckpointError, match="not a usable SAM config.*clip"):
        load_sam(hf_dir)


def test_hf_config_not_json(hf_dir):
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_sam(hf_dir / "model.safetensors")


def test_hf_directory_without_config(hf_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(hf_dir / "model.safetensors", bare / "model.safetensors")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_sam(bare)
    with pytest.raises(CheckpointError, match="Hugging Face-named tensors .* no config.json lies next to it"):
        load_sam(bare / "model.safetensors")


# ---------------------------------------------------------------- object storage (real S3: SeaweedFS)


@pytest.mark.s3
def test_official_checkpoint_from_s3(s3, reference, checkpoint):
    fs = s3.filesystem()
    url = "s3://models/test-checkpoint/tiny.pth"
    fs.put(str(checkpoint), url)
    try:
        digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        model = load_sam(url, storage_options=s3.storage_options, expected_sha256=digest)
        _assert_same_weights(model, reference.state_dict())
        assert model.checkpoint_sha256 == digest
        # The session exports AWS_* as a cluster would: no storage options needed.
        _assert_same_weights(load_sam(url), reference.state_dict())

        fs.pipe("models/test-checkpoint/partial.pth", checkpoint.read_bytes()[:2000])
        with pytest.raises(CheckpointError, match="truncated"):
            load_sam("s3://models/test-checkpoint/partial.pth", storage_options=s3.storage_options)
        with pytest.raises(CheckpointError, match="checkpoint not found"):
            load_sam("s3://models/test-checkpoint/missing.pth", storage_options=s3.storage_options)

        wrong = {**s3.storage_options, "secret": "not-the-secret-42"}
        with pytest.raises(CheckpointError, match="cannot open checkpoint.*PermissionError") as error:
            load_sam(url, storage_options=wrong)
        assert "not-the-secret-42" not in str(error.value) and s3.secret_key not in str(error.value)
    finally:
        fs.rm("models/test-checkpoint", recursive=True)


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server (stdlib) serving ``tmp_path`` on loopback; yields (root dir, base URL)."""
    import functools
    import http.server
    import threading

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_official_checkpoint_over_http(http_root, reference, checkpoint):
    root, base = http_root
    shutil.copy(checkpoint, root / "sam.pth")
    (root / "partial.pth").write_bytes(checkpoint.read_bytes()[:3000])
    _assert_same_weights(load_sam(f"{base}/sam.pth"), reference.state_dict())
    with pytest.raises(CheckpointError, match="truncated"):
        load_sam(f"{base}/partial.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_sam(f"{base}/missing.pth")


def test_hf_safetensors_over_http_finds_its_config(http_root, reference):
    """As with Hub URLs (``.../resolve/main/model.safetensors``): config.json is fetched beside it."""
    from sam_core.hf_format import save_hf_pretrained

    root, base = http_root
    save_hf_pretrained(reference, tiny_config(), str(root / "repo"))
    _assert_same_weights(load_sam(f"{base}/repo/model.safetensors"), reference.state_dict())
