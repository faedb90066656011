"""``load_sam``: one entry point for official ``.pth`` and Hugging Face checkpoints, local or remote.

Formats, told apart by content (magic bytes), not by file name:
- official segment-anything state dict: a torch zip (``PK``) or legacy pickle (``\\x80``) file,
  read with ``torch.load(weights_only=True)`` so a checkpoint can never run code;
- safetensors (8-byte header length, then ``{``): Hugging Face format when a ``config.json`` lies
  next to it (or ``source`` is the directory holding both), else Meta-named tensors.

Every failure a user can cause (missing or truncated file, a PNG, another model's weights, a wrong
config.json, a checksum mismatch) raises ``CheckpointError`` with a message naming the problem,
never a trace from deep inside torch.
"""
from __future__ import annotations

import hashlib
import os
import io
import json
import posixpath
import re
import struct
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import fsspec
import torch

from sam_core.config import SamConfig
from sam_core.infer_config import ShapeInferenceError, config_from_official_state_dict
from sam_core.modeling.sam import PIXEL_MEAN, PIXEL_STD, Sam

HF_CONFIG_NAME = "config.json"
HF_WEIGHTS_NAME = "model.safetensors"
_MODEL_TYPE_ALIASES = {"default": "vit_h"}
_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_SHOW = 5  # how many offending keys an error message lists


class CheckpointError(ValueError):
    """A checkpoint could not be used; the message says why and what was expected."""


@dataclass
class _Weights:
    """A weights file opened for reading: a local path, or the bytes of a remote one."""

    fs: Any
    path: str
    local: bool
    data: Optional[bytes] = None

    def head(self, n: int = 16) -> bytes:
        if self.data is not None:
            return self.data[:n]
        with self.fs.open(self.path, "rb") as f:
            return f.read(n)


def load_sam(
    source: Union[str, "os.PathLike[str]"],
    *,
    model_type: Union[str, SamConfig, None] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: Union[torch.dtype, str, None] = None,
    storage_options: Optional[Mapping[str, Any]] = None,
    expected_sha256: Optional[str] = None,
) -> Sam:
    """Load a SAM model in eval mode.

    source: local path or fsspec URL (``s3://``, ``gs://``, ``https://``, ``file://`` ...) of an
        official ``.pth``, an HF directory (``config.json`` + ``model.safetensors``), or a
        safetensors file (HF when its ``config.json`` is beside it).
    model_type: ``"vit_b" | "vit_l" | "vit_h"`` (or a ``SamConfig``) to force the architecture;
        by default it is read from the config.json or inferred from the tensor shapes.
    dtype: compute dtype (``torch.bfloat16``, ``"bf16"``, ...); default fp32. The positional
        encoding and pixel normalisation stay fp32.
    storage_options: passed to fsspec (credentials, endpoint); never echoed in errors.
    expected_sha256: hex digest of the weights file, verified before anything is parsed.

    The returned model carries ``checkpoint_sha256``, the digest of the weights file it was read
    from (``model.safetensors`` for a Hugging Face directory), for run manifests.
    """
    shown = _display_name(source)
    target_dtype = _resolve_dtype(dtype)
    weights, hf_config_path = _locate(source, storage_options or {}, shown)
    digest = _sha256(weights)
    if expected_sha256 and digest != expected_sha256.strip().lower():
        raise CheckpointError(f"sha256 mismatch for {shown}: expected {expected_sha256.strip().lower()}, got {digest}")
    state_dict, is_safetensors = _read_tensors(weights, shown)

    config: Optional[SamConfig] = None
    if is_safetensors and _looks_hf(state_dict):
        if hf_config_path is None:
            raise CheckpointError(
                f"{shown} holds Hugging Face-named tensors (e.g. {_first(sorted(state_dict)[:1])}) but no "
                f"{HF_CONFIG_NAME} lies next to it; pass the directory holding both"
            )
        config, state_dict = _from_hf(weights.fs, hf_config_path, state_dict, shown)
    elif not is_safetensors:
        state_dict = _unwrap(state_dict, shown)
    if model_type is not None:
        config = _config_for_model_type(model_type)
    if config is None:
        try:
            config = config_from_official_state_dict(state_dict)
        except ShapeInferenceError as error:
            raise CheckpointError(
                f"{shown} is not a SAM checkpoint: cannot read the architecture from its tensors ({error}). "
                f"Its first keys are {_first(sorted(state_dict))}; a SAM state dict has keys like "
                "'image_encoder.patch_embed.proj.weight'."
            ) from None
    model = _place(_instantiate(config, state_dict, shown), device, target_dtype)
    model.checkpoint_sha256 = digest
    return model


def _display_name(source) -> str:
    """``source`` without credentials or query string, for messages."""
    text = str(source)
    text = re.sub(r"(//)[^/@]*@", r"\1", text)  # user:password@host
    return text.split("?", 1)[0]


def _resolve_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise CheckpointError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)}") from None


def _config_for_model_type(model_type) -> SamConfig:
    if isinstance(model_type, SamConfig):
        return model_type
    name = _MODEL_TYPE_ALIASES.get(model_type, model_type)
    try:
        return SamConfig.preset(name)
    except ValueError:
        raise CheckpointError(f"unknown model_type {model_type!r}; use vit_b, vit_l, vit_h or a SamConfig") from None


def _locate(source, storage_options: Mapping, shown: str) -> tuple[_Weights, Optional[str]]:
    """Find the weights file and, if present, the HF config.json that describes it."""
    try:
        fs, path = fsspec.core.url_to_fs(str(source), **storage_options)
        # isfile first: over HTTP every URL is "also a directory" and isdir would fetch the body.
        is_file = fs.isfile(path)
        if not is_file and fs.isdir(path):
            weights_path = posixpath.join(path, HF_WEIGHTS_NAME)
            config_path = posixpath.join(path, HF_CONFIG_NAME)
            if not fs.isfile(weights_path):
                raise CheckpointError(
                    f"{shown} is a directory without {HF_WEIGHTS_NAME}; an HF checkpoint directory holds "
                    f"{HF_CONFIG_NAME} and {HF_WEIGHTS_NAME} (pickled pytorch_model.bin is not loaded)"
                )
            if not fs.isfile(config_path):
                raise CheckpointError(f"{shown} has {HF_WEIGHTS_NAME} but no {HF_CONFIG_NAME}")
        else:
            if not is_file:
                raise CheckpointError(f"checkpoint not found: {shown}")
            weights_path = path
            sibling = posixpath.join(posixpath.dirname(path), HF_CONFIG_NAME)
            config_path = sibling if fs.isfile(sibling) else None
        local = "file" in _protocols(fs)
        data = None if local else fs.cat_file(weights_path)
    except CheckpointError:
        raise
    except Exception as error:  # network, permissions, unknown protocol
        raise CheckpointError(f"cannot open checkpoint {shown}: {type(error).__name__}: {_first_line(error)}") from None
    return _Weights(fs, weights_path, local, data), config_path


def _protocols(fs) -> tuple:
    protocol = fs.protocol
    return protocol if isinstance(protocol, tuple) else (protocol,)


def _sha256(weights: _Weights) -> str:
    """Hex digest of the weights file (remote files are already in memory; local ones are re-read)."""
    digest = hashlib.sha256()
    if weights.data is not None:
        digest.update(weights.data)
    else:
        with weights.fs.open(weights.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 23), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _is_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    header_length = struct.unpack("<Q", head[:8])[0]
    return 1 < header_length < (1 << 30) and head[8:9] == b"{"


def _read_tensors(weights: _Weights, shown: str) -> tuple[dict, bool]:
    """Parse the weights file by its magic bytes; returns (tensors, is_safetensors)."""
    head = weights.head()
    if _is_safetensors(head):
        import safetensors.torch

        try:
            if weights.data is not None:
                return safetensors.torch.load(weights.data), True
            return safetensors.torch.load_file(weights.path), True
        except Exception as error:
            raise CheckpointError(
                f"{shown} is a damaged or truncated safetensors file ({_first_line(error)})"
            ) from None
    is_zip, is_pickle = head.startswith(b"PK\x03\x04"), head[:1] == b"\x80"
    if not (is_zip or is_pickle):
        raise CheckpointError(
            f"{shown} is not a checkpoint: it starts with {head[:8]!r}; expected a PyTorch .pth "
            "(zip or pickle) or a safetensors file"
        )
    if is_zip and not _zip_is_complete(weights):
        raise CheckpointError(
            f"{shown} is truncated (a partial download?): a PyTorch zip checkpoint ends with a zip "
            "directory record and this file has none"
        )
    try:
        if weights.data is not None:
            loaded = torch.load(io.BytesIO(weights.data), map_location="cpu", weights_only=True)
        else:
            # No mmap: the model adopts these tensors, and a file mapped into it could be rewritten
            # underneath a running model (SIGBUS); reading costs the same memory in the end.
            loaded = torch.load(weights.path, map_location="cpu", weights_only=True)
    except Exception as error:
        message = _first_line(error)
        if "weights_only" in message.lower() or "unsupported global" in message.lower():
            raise CheckpointError(
                f"{shown} was refused: it holds pickled objects other than tensors, which could run code "
                "when loaded; only plain state dicts are accepted"
            ) from None
        raise CheckpointError(
            f"{shown} is a damaged or truncated PyTorch checkpoint (a partial download?): {message}"
        ) from None
    return loaded, False


def _zip_is_complete(weights: _Weights) -> bool:
    """True when the zip end-of-central-directory record is in the file's last 64 KiB + 22 bytes."""
    tail_length = (1 << 16) + 22
    if weights.data is not None:
        tail = weights.data[-tail_length:]
    else:
        with weights.fs.open(weights.path, "rb") as f:
            size = weights.fs.size(weights.path)
            f.seek(max(0, size - tail_length))
            tail = f.read()
    return b"PK\x05\x06" in tail


def _unwrap(loaded: Any, shown: str) -> dict:
    """The state dict inside a torch.load result (plain, or under 'model' / 'state_dict')."""
    if isinstance(loaded, Mapping):
        for wrapper in ("model", "state_dict"):
            inner = loaded.get(wrapper)
            if isinstance(inner, Mapping) and len(loaded) <= 3 and not _has_tensors(loaded):
                loaded = inner
                break
        if _has_tensors(loaded):
            not_tensors = [k for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
            if not_tensors:
                raise CheckpointError(f"{shown}: entries {_first(not_tensors)} are not tensors")
            return dict(loaded)
    raise CheckpointError(
        f"{shown} holds a {type(loaded).__name__}, not a state dict of tensors (name -> tensor)"
    )


def _has_tensors(d: Mapping) -> bool:
    return any(isinstance(v, torch.Tensor) for v in d.values())


def _looks_hf(state_dict: Mapping) -> bool:
    """transformers' SamModel names its image encoder ``vision_encoder``; Meta's ``image_encoder``."""
    return any(k.startswith("vision_encoder.") for k in state_dict)


def _from_hf(fs, config_path: str, hf_state_dict: dict, shown: str) -> tuple[SamConfig, dict]:
    from sam_core import hf_format

    try:
        with fs.open(config_path, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{HF_CONFIG_NAME} next to {shown} is not valid JSON: {_first_line(error)}") from None
    try:
        config = hf_format.config_from_hf_dict(raw)
    except ValueError as error:
        raise CheckpointError(f"{HF_CONFIG_NAME} next to {shown} is not a usable SAM config: {error}") from None
    try:
        state_dict = hf_format.hf_to_official_state_dict(hf_state_dict)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{shown}: its tensors are not a Hugging Face SamModel's: {error}") from None
    return config, state_dict


def _instantiate(config: SamConfig, state_dict: Mapping[str, torch.Tensor], shown: str) -> Sam:
    """Check names and shapes strictly, then build the model around the checkpoint's tensors."""
    with torch.device("meta"):
        model = Sam(config)  # no memory, no random init: every tensor comes from the checkpoint
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} has {tuple(state_dict[k].shape)}, expected {expected[k]}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    if missing or unexpected or misshaped:
        v = config.vision_config
        problems = [
            f"{len(label_list)} {label}: {_first(label_list)}"
            for label, label_list in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if label_list
        ]
        raise CheckpointError(
            f"{shown} does not fit the SAM architecture (width {v.hidden_size}, depth {v.num_hidden_layers}, "
            f"heads {v.num_attention_heads}, image {v.image_size}): " + "; ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
    # Non-persistent constants are not in the checkpoint: materialise them off the meta device.
    model.pixel_mean = torch.tensor(PIXEL_MEAN).view(-1, 1, 1)
    model.pixel_std = torch.tensor(PIXEL_STD).view(-1, 1, 1)
    return model


def _place(model: Sam, device, dtype: Optional[torch.dtype]) -> Sam:
    model = model.to(device=device, dtype=torch.float32)
    if dtype is not None and dtype != torch.float32:
        for part in (model.image_encoder, model.prompt_encoder, model.mask_decoder):
            part.to(dtype)
        model.prompt_encoder.pe_layer.float()  # Fourier phases need fp32
    return model.eval()


def _first(items) -> str:
    items = list(items)
    shown = ", ".join(repr(i) if not isinstance(i, str) or " has " not in i else i for i in items[:_SHOW])
    return shown + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return lines[0].split(". ", 1)[0][:300]  # first sentence: torch's advice paragraphs add noise
