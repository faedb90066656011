"""Security: credentials never leak into logs, manifests or error rows; output names are ours.

Unit tests of ``pipeline.redact`` first, then runs of the real pipeline with credentials set.
"""
import io
import json
import logging
import os

import pytest

from pipeline.config import AnnotateConfig
from pipeline.redact import (
    MASK,
    RedactingFilter,
    env_secrets,
    is_secret_key,
    redact_mapping,
    redact_text,
    secret_values,
)

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FQoGZXIvYXdzEXAMPLESESSIONTOKEN")


def test_env_credentials_are_masked_wherever_they_appear(aws_env):
    text = f"failed: signature for {KEY_ID} with {SECRET} rejected (token FQoGZXIvYXdzEXAMPLESESSIONTOKEN)"
    cleaned = redact_text(text)
    assert SECRET not in cleaned and KEY_ID not in cleaned and "FQoGZXIvYXdz" not in cleaned
    assert cleaned.startswith("failed: signature for ***")
    assert set(env_secrets()) == {KEY_ID, SECRET, "FQoGZXIvYXdzEXAMPLESESSIONTOKEN"}


def test_generic_credential_shapes_are_masked_without_knowing_the_value():
    text = (
        "GET https://alice:hunter2pass@store.example.com/b/k.jpg?X-Amz-Credential=AKIA/2024&"
        "X-Amz-Signature=deadbeef0123&sig=abcdef123 failed; aws_secret_access_key='s3cr3tvalue'; "
        "id AKIAABCDEFGHIJKLMNOP; password: letmein99"
    )
    cleaned = redact_text(text)
    for leaked in ("alice", "hunter2pass", "deadbeef0123", "abcdef123", "s3cr3tvalue", "AKIAABCDEFGHIJKLMNOP", "letmein99"):
        assert leaked not in cleaned, leaked
    # What is not a credential stays readable.
    assert "store.example.com/b/k.jpg" in cleaned and cleaned.startswith("GET https://***@")


def test_ordinary_text_is_left_alone(aws_env):
    text = "object not found (deleted or moved since it was listed): s3://bucket/images/design=3/a.jpg"
    assert redact_text(text) == text
    assert redact_text(None) is None


def test_storage_options_are_masked_by_key_name_and_value():
    options = {
        "key": "minio-user-1234",
        "secret": "minio-secret-5678",
        "token": None,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:8333", "aws_session_token": "tok-abcdef"},
        "anon": False,
    }
    public = redact_mapping({"storage_options": options, "note": "used minio-secret-5678 to sign"})
    text = json.dumps(public)
    for value in ("minio-user-1234", "minio-secret-5678", "tok-abcdef"):
        assert value not in text
    assert public["storage_options"]["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:8333"
    assert public["storage_options"]["anon"] is False and public["storage_options"]["token"] is None
    assert public["note"] == f"used {MASK} to sign"
    assert sorted(secret_values(options)) == ["minio-secret-5678", "minio-user-1234", "tok-abcdef"]
    assert is_secret_key("key") and is_secret_key("AWS_SECRET_ACCESS_KEY") and not is_secret_key("checkpoint_sha256")


def test_run_config_public_form_has_no_credentials(aws_env):
    config = AnnotateConfig(
        input="s3://bucket/in/",
        output="s3://bucket/out/",
        checkpoint="s3://bucket/models/tiny.pth",
        storage_options={"key": "minio-user-1234", "secret": "minio-secret-5678"},
    )
    text = json.dumps(config.to_public_dict())
    assert "minio-user-1234" not in text and "minio-secret-5678" not in text
    assert "s3://bucket/models/tiny.pth" in text
    # The full form still carries them: workers need them.
    assert config.to_dict()["storage_options"]["secret"] == "minio-secret-5678"


def test_log_filter_scrubs_messages_arguments_and_tracebacks(aws_env):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter(["storage-opt-secret-99"]))
    logger = logging.getLogger("test_security.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("connecting with %s and %s", SECRET, "storage-opt-secret-99")
        try:
            raise RuntimeError(f"auth failed for {KEY_ID}")
        except RuntimeError:
            logger.exception("read failed")
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue()
    assert "read failed" in written and "RuntimeError: auth failed for ***" in written
    for leaked in (SECRET, KEY_ID, "storage-opt-secret-99"):
        assert leaked not in written


class _RunsCode:
    """A pickle payload that would create a file when unpickled with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path):
    import torch

    from sam_core import CheckpointError, load_sam

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"

    torch.save({"image_encoder.pos_embed": _RunsCode(str(marker))}, evil)
    with pytest.raises(CheckpointError):
        load_sam(str(evil))
    assert not marker.exists()
    # The same file *would* run code with an unsafe loader: the test's payload is real.
    with open(evil, "rb") as handle:
        torch.load(handle, weights_only=False)
    assert marker.exists()
    os.remove(marker)
