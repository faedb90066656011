"""Small building blocks shared by the encoder and the decoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sam_core.modeling.cpu_linear import linear

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def activation_class(name: str) -> type[nn.Module]:
    """``"gelu"`` -> ``nn.GELU`` etc.; the names are the Hugging Face ``hidden_act`` ones."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}") from None


class MLPBlock(nn.Module):
    """Two-layer feed-forward block ``lin2(act(lin1(x)))`` on the last dim: (..., dim) -> (..., dim).

    The products go through ``cpu_linear.linear`` (oneDNN where faster on this CPU, with an exact
    GELU fused into the first one).
    """

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.act) is nn.GELU and self.act.approximate == "none":
            hidden = linear(x, self.lin1.weight, self.lin1.bias, gelu=True)
        else:
            hidden = self.act(linear(x, self.lin1.weight, self.lin1.bias))
        return linear(hidden, self.lin2.weight, self.lin2.bias)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of a (B, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channels_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """The same normalisation on a (..., C) tensor. ``F.layer_norm`` accumulates its statistics
        in fp32 for a bf16 input, as nn.LayerNorm does, in one pass."""
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
