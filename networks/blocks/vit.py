# SPDX-License-Identifier: Apache-2.0
"""Vision Transformer encoder layers (arXiv 2010.11929) with torch's fused scaled-dot-product attention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock

__all__ = [
    "MultiHeadSelfAttention",
    "ViTEncoderBlock",
    "ViTEncoder",
    "GridPositionEmbedding",
    "resize_position_embedding",
]


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention on ``(B, N, C)`` tokens through ``F.scaled_dot_product_attention``.

    MONAI's ``SABlock`` is not used because (monai 1.5) it rearranges with einops inside ``forward``, ties the
    attention-weight dropout to the output dropout, and passes its dropout to the fused kernel even in eval mode.
    The query/key/value projections are one ``qkv`` linear layer (rows ordered q, k, v; heads contiguous).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
        for name, rate in (("dropout_rate", dropout_rate), ("attention_dropout_rate", attention_dropout_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate}.")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.attention_dropout_rate = attention_dropout_rate
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.drop_output = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.attention_dropout_rate if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.drop_output(self.out_proj(x))


class ViTEncoderBlock(nn.Module):
    """Pre-norm transformer layer: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``.

    ``dropout_rate`` acts in the MLP and, unless ``projection_dropout_rate`` is given, after the attention
    projection (as in ViT); ``attention_dropout_rate`` acts on the attention weights.
    """

    def __init__(
        self,
        hidden_size: int,
        mlp_dim: int,
        num_heads: int,
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        projection_dropout_rate: float | None = None,
    ) -> None:
        super().__init__()
        if projection_dropout_rate is None:
            projection_dropout_rate = dropout_rate
        self.norm1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.attn = MultiHeadSelfAttention(
            hidden_size, num_heads, projection_dropout_rate, attention_dropout_rate, qkv_bias
        )
        self.norm2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp = MLPBlock(hidden_size, mlp_dim, dropout_rate, act="GELU", dropout_mode="vit")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """A stack of ``num_layers`` :class:`ViTEncoderBlock` followed by a final LayerNorm; ``(B, N, C) -> (B, N, C)``.

    Linear layers are initialised as in ViT (Xavier-uniform weights, N(0, 1e-6) biases).  The dropout
    arguments are those of :class:`ViTEncoderBlock`.
    """

    def __init__(
        self,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        projection_dropout_rate: float | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {num_layers}.")
        self.blocks = nn.ModuleList(
            ViTEncoderBlock(
                hidden_size,
                mlp_dim,
                num_heads,
                dropout_rate,
                attention_dropout_rate,
                qkv_bias,
                layer_norm_eps,
                projection_dropout_rate,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.normal_(module.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def resize_position_embedding(
    position_embedding: torch.Tensor, old_grid: list[int], new_grid: list[int], mode: str
) -> torch.Tensor:
    """Interpolate ``(1, prod(old_grid), C)`` position embeddings over their token grid to ``new_grid``.

    ``align_corners=True`` keeps the corner embeddings fixed, as ``scipy.ndimage.zoom`` does in the official
    TransUNet loader.
    """
    c = position_embedding.shape[-1]
    grid = position_embedding.transpose(1, 2).reshape([1, c] + old_grid)
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=True)
    return grid.flatten(2).transpose(1, 2)


class GridPositionEmbedding(nn.Module):
    """Flattens a ``(B, C, *grid)`` feature map to ``(B, N, C)`` tokens and adds learned position embeddings.

    The embeddings are learned for ``grid_size``; for another grid they are interpolated (bilinear in 2D,
    trilinear in 3D) at forward time, so any input size works.
    """

    def __init__(self, grid_size: Sequence[int], hidden_size: int) -> None:
        super().__init__()
        if len(grid_size) not in (2, 3) or any(g < 1 for g in grid_size):
            raise ValueError(f"grid_size must hold 2 or 3 positive ints, got {grid_size}.")
        self.grid_size = [int(g) for g in grid_size]
        self.mode = "bilinear" if len(grid_size) == 2 else "trilinear"
        n_tokens = 1
        for g in self.grid_size:
            n_tokens *= g
        self.position_embedding = nn.Parameter(torch.zeros(1, n_tokens, hidden_size))
        nn.init.trunc_normal_(self.position_embedding, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = list(x.shape[2:])
        position_embedding = self.position_embedding
        if grid != self.grid_size:
            position_embedding = resize_position_embedding(position_embedding, self.grid_size, grid, self.mode)
        return x.flatten(2).transpose(1, 2) + position_embedding
