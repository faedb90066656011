"""Linear layers (x @ W^T + b, optionally followed by exact GELU) through oneDNN on CPUs where it
is faster than PyTorch's default.

PyTorch runs fp32 linears on MKL's sgemm. On processors other than Intel's, MKL does not pick its
widest kernels: on an AMD EPYC (Zen 4, 2 threads) its sgemm measured ~125-155 GFLOPS against
~155-190 for oneDNN (also bundled with PyTorch) on the encoder's and decoder's shapes. oneDNN also
applies the GELU inside the product, saving a pass over what is often the largest output.
Which library is faster is measured once per process, dtype and thread count (``prefers_onednn``),
never assumed, so a processor where MKL wins keeps MKL.

Only for inference on CPU tensors: anything that needs a gradient, other devices, and builds
without oneDNN take ``F.linear``. Under CPU autocast the inputs are cast to autocast's dtype, as
autocast does for ``F.linear``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from sam_core.timing import fastest

# (rows, in, out) of the product timed for the choice: the size of the decoder's per-pixel
# projections, large enough for either library to reach its steady speed (~1 GFLOP).
_PROBE_SHAPE = (4096, 256, 256)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, gelu: bool = False
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (x (..., in), weight (out, in) -> (..., out)), then exact GELU
    when ``gelu``; through oneDNN where ``prefers_onednn`` measured it faster."""
    dtype = _onednn_dtype(x, weight)
    if dtype is None:
        out = F.linear(x, weight, bias)
        if not gelu:
            return out
        # In place when no gradient is needed: a fresh buffer of this size costs more in page
        # faults than the GELU itself on a CPU.
        return F.gelu(out) if out.requires_grad else F.gelu(out, out=out)
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


def _onednn_dtype(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype oneDNN should compute in for this call, or None for ``F.linear``."""
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dtype not in (torch.float32, torch.bfloat16) or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not torch.is_autocast_enabled("cpu") and weight.dtype != dtype:
        return None  # mixed dtypes: let F.linear raise or promote as it always does
    return dtype if prefers_onednn(dtype, torch.get_num_threads()) else None


@functools.lru_cache(maxsize=None)
def prefers_onednn(dtype: torch.dtype, threads: int) -> bool:
    """Whether oneDNN computed a linear of the probe shape faster than ``F.linear`` in ``dtype``
    on this machine with ``threads`` threads (measured once; ~50 ms)."""
    if not _onednn_linear_available():
        return False
    rows, n_in, n_out = _PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n_in, generator=generator).to(dtype)
    weight = torch.randn(n_out, n_in, generator=generator).to(dtype)
    bias = torch.randn(n_out, generator=generator).to(dtype)
    with torch.no_grad():
        winner = fastest({
            "aten": lambda: F.linear(x, weight, bias),
            "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""),
        })
    return winner == "onednn"


@functools.lru_cache(maxsize=None)
def _onednn_linear_available() -> bool:
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:  # the op exists in every x86 build; check it also runs here (other CPU builds may lack kernels)
        x = torch.ones(2, 3)
        return bool(torch.ops.mkldnn._linear_pointwise(x, torch.ones(4, 3), None, "none", [], "").eq(3).all())
    except RuntimeError:
        return False
