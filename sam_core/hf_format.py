"""The Hugging Face ``transformers`` checkpoint format: config.json and state-dict key names.

A Hub SAM repository (``facebook/sam-vit-base``, SlimSAM, MedSAM, ...) holds ``config.json`` plus
``model.safetensors`` whose keys follow ``transformers.SamModel``. Our model uses Meta's
segment-anything key names, so loading an HF checkpoint is: read the config with
:func:`config_from_hf_dict`, rename the tensors with :func:`hf_to_official_state_dict`, then a strict
``load_state_dict``. Every tensor keeps its layout in both formats; only names differ, plus two
structural points:

* HF stores the random-Fourier positional matrix twice (``shared_image_embedding`` and the tied
  ``prompt_encoder.shared_embedding``); Meta stores it once, as ``prompt_encoder.pe_layer``.
* Meta's small MLPs (IoU head, hypernetworks) number their linears ``layers.0 .. layers.{d-1}``; HF
  names the first ``proj_in``, the last ``proj_out`` and the middle ones ``layers.0 .. layers.{d-3}``,
  so the depth of each MLP is read from the keys.

Pure functions on dicts and tensors; no model code here.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch

from .config import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------

_SUB_CONFIGS = (
    ("vision_config", SamVisionConfig, "sam_vision_model"),
    ("prompt_encoder_config", SamPromptEncoderConfig, "sam_prompt_encoder"),
    ("mask_decoder_config", SamMaskDecoderConfig, "sam_mask_decoder"),
)

# Keys that mark a vision_config for an encoder that is not SAM's ViT (MobileSAM's TinyViT,
# EfficientSAM, ...). Ignoring them would silently build a ViT-B and fail later on every tensor.
_FOREIGN_VISION_KEYS = ("embed_dims", "depths", "window_sizes", "backbone_config")

_INT_FIELDS = {
    "hidden_size", "output_channels", "num_hidden_layers", "num_attention_heads", "num_channels",
    "image_size", "patch_size", "window_size", "num_pos_feats", "mlp_dim", "mask_input_channels",
    "num_point_embeddings", "attention_downsample_rate", "num_multimask_outputs", "iou_head_depth",
    "iou_head_hidden_dim",
}
# Fields that may legitimately be 0 (window_size 0 means global attention everywhere).
_NON_NEGATIVE_INT_FIELDS = {"window_size"}
_FLOAT_FIELDS = {"layer_norm_eps", "attention_dropout", "initializer_range", "mlp_ratio"}
_BOOL_FIELDS = {"qkv_bias", "use_abs_pos", "use_rel_pos"}
_STR_FIELDS = {"hidden_act"}


def config_from_hf_dict(d: Mapping[str, Any]) -> SamConfig:
    """Build a :class:`SamConfig` from the dict of an HF ``config.json`` (``model_type: "sam"``).

    Missing sub-configs and fields take the HF defaults (ViT-B sizes). Unknown keys are ignored:
    Hub configs carry many (``intermediate_size``, ``projection_dim``, ``dropout``, generation
    settings of old ``PretrainedConfig`` dumps); in particular ``intermediate_size`` is NOT the MLP
    width, ``mlp_dim`` is (SlimSAM sets it with a pruned ``hidden_size``). Raises ``ValueError`` that
    names the offending field for a non-SAM or malformed config.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"an HF SAM config must be a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type", "sam")
    if model_type not in ("sam", "", None):
        raise ValueError(f"config.json has model_type {model_type!r}; only plain SAM ('sam') is supported")
    parts = {}
    for name, cls, _ in _SUB_CONFIGS:
        sub = d.get(name)
        if sub is None:
            sub = {}
        if not isinstance(sub, Mapping):
            raise ValueError(f"{name} must be a JSON object, got {type(sub).__name__}")
        if name == "vision_config":
            foreign = sorted(k for k in _FOREIGN_VISION_KEYS if k in sub)
            if foreign:
                raise ValueError(
                    f"vision_config has {foreign}: this is not SAM's ViT image encoder "
                    "(e.g. MobileSAM's TinyViT), which is not supported"
                )
        parts[name] = cls(**_known_fields(cls, sub, name))
    return SamConfig(**parts)


def _known_fields(cls, sub: Mapping[str, Any], where: str) -> dict:
    """The fields of dataclass ``cls`` present in ``sub``, type-checked and normalised."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in sub:
            out[f.name] = _check_value(f"{where}.{f.name}", f.name, sub[f.name])
    return out


def _check_value(path: str, name: str, value: Any) -> Any:
    if name == "mlp_dim" and value is None:
        return None
    if name in ("image_size", "patch_size") and isinstance(value, (list, tuple)):
        # HF types these as int | [h, w]; SAM is square, so only equal sides make sense.
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{path} must be square (one int or [n, n]), got {value!r}")
        value = value[0]
    if name == "global_attn_indexes":
        if not isinstance(value, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in value):
            raise ValueError(f"{path} must be a list of non-negative ints, got {value!r}")
        return tuple(int(i) for i in value)
    if name in _INT_FIELDS:
        minimum = 0 if name in _NON_NEGATIVE_INT_FIELDS else 1
        if not (_is_int(value) and value >= minimum):
            raise ValueError(f"{path} must be an integer >= {minimum}, got {value!r}")
        return int(value)
    if name in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{path} must be a non-negative number, got {value!r}")
        return float(value)
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ValueError(f"{path} must be true or false, got {value!r}")
        return value
    if name in _STR_FIELDS:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{path} must be an activation name, got {value!r}")
        return value
    return value


def _is_int(value: Any) -> bool:
    """True for ints and integral floats (JSON writers sometimes emit ``1024.0``), never for bools."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def config_to_hf_dict(cfg: SamConfig) -> dict:
    """The ``config.json`` dict for ``cfg`` that ``transformers.SamConfig`` accepts.

    ``mlp_dim`` is written resolved (an int), so readers that ignore ``mlp_ratio`` get the width right.
    """
    out: dict[str, Any] = {"architectures": ["SamModel"], "model_type": "sam", "initializer_range": 0.02}
    for name, _, hf_model_type in _SUB_CONFIGS:
        sub = getattr(cfg, name)
        values = {}
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            values[f.name] = list(value) if isinstance(value, tuple) else value
        if name == "vision_config":
            values["mlp_dim"] = sub.resolved_mlp_dim
        values["model_type"] = hf_model_type
        out[name] = values
    return out


# ---------------------------------------------------------------------------------------------
# state-dict key names
# ---------------------------------------------------------------------------------------------

# (Meta / our prefix, HF prefix). ``{i}`` and ``{n}`` stand for layer and norm numbers. The first rule
# whose prefix matches wins, so specific rules come before general ones; the rest of the key (e.g.
# ``attn.qkv.weight``) is the same in both formats.
_PREFIX_RULES = (
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.blocks.{i}.norm{n}.", "vision_encoder.layers.{i}.layer_norm{n}."),
    ("image_encoder.blocks.{i}.", "vision_encoder.layers.{i}."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    ("image_encoder.", "vision_encoder."),
    ("prompt_encoder.point_embeddings.{i}.", "prompt_encoder.point_embed.{i}."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("mask_decoder.transformer.layers.{i}.norm{n}.", "mask_decoder.transformer.layers.{i}.layer_norm{n}."),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
)

OFFICIAL_POSITIONAL_KEY = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
HF_POSITIONAL_KEY = "shared_image_embedding.positional_embedding"
# transformers ties this one to HF_POSITIONAL_KEY and leaves it out of saved files.
HF_TIED_POSITIONAL_KEY = "prompt_encoder.shared_embedding.positional_embedding"

# The small MLPs whose linears are renumbered (see module docstring), in both namings.
_MLP = r"(?P<mlp>mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+)\.)"
_OFFICIAL_MLP = re.compile(_MLP + r"layers\.(?P<j>\d+)\.")
_HF_MLP = re.compile(_MLP + r"(?:(?P<end>proj_in|proj_out)|layers\.(?P<j>\d+))\.")

# Official SAM keeps these as non-persistent buffers; a model that saved them anyway must not leak
# them into an HF file, where they would be unexpected keys.
_CONSTANT_BUFFERS = ("pixel_mean", "pixel_std")


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name in ("i", "n"):
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>\\d+)")
    return re.compile(pattern)


_OFFICIAL_TO_HF = tuple((_template_regex(src), dst) for src, dst in _PREFIX_RULES)
_HF_TO_OFFICIAL = tuple((_template_regex(dst), src) for src, dst in _PREFIX_RULES)


def _rename_prefix(key: str, rules) -> str:
    for regex, template in rules:
        m = regex.match(key)
        if m:
            return template.format(**m.groupdict()) + key[m.end():]
    return key


def _official_mlp_depths(keys) -> dict[str, int]:
    """``{mlp prefix: number of linears}`` from Meta-named keys (``layers.0 .. layers.{d-1}``)."""
    depths: dict[str, int] = {}
    for key in keys:
        m = _OFFICIAL_MLP.match(key)
        if m:
            depths[m["mlp"]] = max(depths.get(m["mlp"], 0), int(m["j"]) + 1)
    return depths


def _hf_mlp_depths(keys) -> dict[str, int]:
    """``{mlp prefix: number of linears}`` from HF-named keys: proj_in + ``layers.*`` + proj_out."""
    middle: dict[str, int] = {}
    for key in keys:
        m = _HF_MLP.match(key)
        if m:
            count = 0 if m["end"] else int(m["j"]) + 1
            middle[m["mlp"]] = max(middle.get(m["mlp"], 0), count)
    return {mlp: n + 2 for mlp, n in middle.items()}


def _official_mlp_key_to_hf(key: str, depths: dict[str, int]) -> Optional[str]:
    m = _OFFICIAL_MLP.match(key)
    if m is None:
        return None
    j, rest = int(m["j"]), key[m.end():]
    if j == 0:
        name = "proj_in"
    elif j == depths[m["mlp"]] - 1:
        name = "proj_out"
    else:
        name = f"layers.{j - 1}"
    return f"{m['mlp']}{name}.{rest}"


def _hf_mlp_key_to_official(key: str, depths: dict[str, int]) -> Optional[str]:
    m = _HF_MLP.match(key)
    if m is None:
        return None
    if m["end"] == "proj_in":
        j = 0
    elif m["end"] == "proj_out":
        j = depths[m["mlp"]] - 1
    else:
        j = int(m["j"]) + 1
    return f"{m['mlp']}layers.{j}.{key[m.end():]}"


def official_to_hf_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta segment-anything (= our) key names -> ``transformers.SamModel`` key names.

    The result loads into ``SamModel`` with ``strict=True``: the positional matrix appears under both
    HF names (the tied copy is the same tensor). Keys that belong to no known SAM module pass through
    unchanged, so a strict load reports them by their original names.
    """
    depths = _official_mlp_depths(sd)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in _CONSTANT_BUFFERS:
            continue
        if key == OFFICIAL_POSITIONAL_KEY:
            out[HF_POSITIONAL_KEY] = value
            out[HF_TIED_POSITIONAL_KEY] = value
            continue
        new = _official_mlp_key_to_hf(key, depths)
        out[new if new is not None else _rename_prefix(key, _OFFICIAL_TO_HF)] = value
    return out


def hf_to_official_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``transformers.SamModel`` key names -> Meta segment-anything (= our) key names.

    Accepts the positional matrix under either HF name or both (saved files hold only
    ``shared_image_embedding``); raises ``ValueError`` if both are present and differ. Unknown keys
    pass through unchanged so that a strict load names them.
    """
    depths = _hf_mlp_depths(sd)
    out: dict[str, torch.Tensor] = {}
    positional = [sd[k] for k in (HF_POSITIONAL_KEY, HF_TIED_POSITIONAL_KEY) if k in sd]
    if len(positional) == 2 and (
        positional[0].shape != positional[1].shape or not torch.equal(positional[0], positional[1])
    ):
        raise ValueError(
            f"{HF_POSITIONAL_KEY} and {HF_TIED_POSITIONAL_KEY} are tied in SAM but differ in this checkpoint"
        )
    if positional:
        out[OFFICIAL_POSITIONAL_KEY] = positional[0]
    for key, value in sd.items():
        if key in (HF_POSITIONAL_KEY, HF_TIED_POSITIONAL_KEY):
            continue
        new = _hf_mlp_key_to_official(key, depths)
        out[new if new is not None else _rename_prefix(key, _HF_TO_OFFICIAL)] = value
    return out


# ---------------------------------------------------------------------------------------------
# writing an HF repository
# ---------------------------------------------------------------------------------------------

HF_CONFIG_NAME = "config.json"
HF_WEIGHTS_NAME = "model.safetensors"


def save_hf_pretrained(
    model_or_state_dict: Union[torch.nn.Module, Mapping[str, torch.Tensor]],
    config: SamConfig,
    directory: str,
    *,
    storage_options: Optional[Mapping[str, Any]] = None,
) -> str:
    """Write ``config.json`` + ``model.safetensors`` in the HF repository layout.

    ``model_or_state_dict`` is our (or Meta's) ``Sam`` or its state dict, in Meta key names.
    ``directory`` is a local path or any fsspec URL (``storage_options`` go to fsspec, as in
    ``load_sam``); it is created if needed. Like
    ``transformers``' ``save_pretrained``, the tied positional copy is left out of the file.
    The result loads with ``transformers.SamModel.from_pretrained`` and with ``sam_core.load_sam``.
    Returns ``directory``.
    """
    import fsspec
    from safetensors.torch import save as safetensors_bytes

    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) else model_or_state_dict
    hf_sd = official_to_hf_state_dict(sd)
    hf_sd.pop(HF_TIED_POSITIONAL_KEY, None)
    # safetensors refuses views and shared storage; a contiguous copy of each tensor is both.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in hf_sd.items()}
    blob = safetensors_bytes(tensors, metadata={"format": "pt"})
    config_text = json.dumps(config_to_hf_dict(config), indent=2, sort_keys=True) + "\n"

    fs, root = fsspec.core.url_to_fs(str(directory), **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    root = root.rstrip("/")
    with fs.open(f"{root}/{HF_CONFIG_NAME}", "w") as f:
        f.write(config_text)
    with fs.open(f"{root}/{HF_WEIGHTS_NAME}", "wb") as f:
        f.write(blob)
    return directory
