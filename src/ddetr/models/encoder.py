"""The encoder (paper §4.1, official code): deformable self-attention over the pixels of all levels, post-norm."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ddetr.models.deform_attn import MSDeformAttn, fast_inference
from ddetr.ops.dropout import Dropout
from ddetr.ops.linear import Linear, compute_dtype, linear

Shapes = list[tuple[int, int]]
AttentionFactory = Callable[[], nn.Module]  # builds MSDeformAttn, or DenseAttention for the DETR baseline


class FFNLayer(nn.Module):
    """Adds the FFN (linear1 -> ReLU -> dropout -> linear2 -> dropout, residual) under the official names."""

    def _init_ffn(self, d_model: int, dim_feedforward: int, dropout: float) -> None:
        self.linear1 = Linear(d_model, dim_feedforward)
        self.linear2 = Linear(dim_feedforward, d_model)
        self.dropout_ffn1 = Dropout(dropout)
        self.dropout_ffn2 = Dropout(dropout)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        # dropout_ffn1 applies the ReLU: one pass in CPU training, and the ReLU's output is not kept for the backward
        return x + self.dropout_ffn2(self.linear2(self.dropout_ffn1(self.linear1(x), relu=True)))


class EncoderLayer(FFNLayer):
    """Self-attention of every pixel (query = feature + position) around its own location, then an FFN."""

    CHUNK = 2048  # pixels per step of the inference path; 1024-4096 measured alike, 2048 best by a little

    def __init__(self, make_attn: AttentionFactory, d_model: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = make_attn()
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self._init_ffn(d_model, dim_feedforward, dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor, shapes: Shapes,
                padding_mask: torch.Tensor) -> torch.Tensor:
        if self._in_chunks(src):
            return self._forward_in_chunks(src, pos, reference_points, shapes, padding_mask)
        attn = self.self_attn(src + pos, reference_points, src, shapes, padding_mask, value_pos=pos)
        src = self.norm1(src + self.dropout1(attn))
        return self.norm2(self.ffn(src))

    def _in_chunks(self, src: torch.Tensor) -> bool:
        """CPU inference without autograd or export: nothing is kept for a backward pass, and dropout is off. (On a
        GPU the whole-map ops are not memory-bound in the same way, and chunks would only add kernel launches.)"""
        return (src.device.type == "cpu" and isinstance(self.self_attn, MSDeformAttn)
                and fast_inference(self, list(self.children())))

    def _forward_in_chunks(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                           shapes: Shapes, padding_mask: torch.Tensor) -> torch.Tensor:
        """The same layer with everything after the sampling done CHUNK pixels at a time.

        At the encoder's size (22k pixels at 800x1333) the FFN's hidden activations (91 MB) leave the cache, and
        the residual adds, ReLU and bias copies each stream the whole map through memory; in chunks they stay in
        L2/L3, and oneDNN adds the bias, ReLU and residuals inside the GEMMs (`ddetr.ops.linear`). Measured
        1.15-1.3x for the whole detector (README, speed). Under autocast everything is in the autocast dtype.
        The submodules are used through their weights, so a forward hook on any of them selects the layer as written.
        """
        attn = self.self_attn
        dtype = compute_dtype(src)  # under autocast: inputs and weights cast once here, not per GEMM or chunk
        src, pos = src.to(dtype), pos.to(dtype)  # (a bf16 + fp32 add is 6x slower than a bf16 one)
        sampled = attn.sample(src + pos, reference_points, src, shapes, padding_mask, by_weights=True)
        n, s, c = src.shape
        rows, sampled = src.reshape(n * s, c), sampled.reshape(n * s, c)
        out = torch.empty_like(rows)
        (w0, b0), (w1, b1), (w2, b2) = [(m.weight.to(dtype), m.bias.to(dtype))
                                        for m in (attn.output_proj, self.linear1, self.linear2)]
        for i in range(0, n * s, self.CHUNK):
            j = min(i + self.CHUNK, n * s)
            x = self.norm1(linear(sampled[i:j], w0, b0, residual=rows[i:j])).to(dtype)  # autocast norms give fp32
            hidden = linear(x, w1, b1, relu=True)
            out[i:j] = self.norm2(linear(hidden, w2, b2, residual=x))
        return out.view(n, s, c)


class Encoder(nn.Module):
    def __init__(self, layers: list[EncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, shapes: Shapes, ratios: torch.Tensor,
                padding_mask: torch.Tensor) -> torch.Tensor:
        """src, pos (B, S, C) flattened levels; ratios (B, L, 2) valid fractions; padding_mask (B, S) -> (B, S, C)."""
        reference_points = encoder_reference_points(shapes, ratios)
        if isinstance(self.layers[0].self_attn, MSDeformAttn):
            reference_points = self.layers[0].self_attn.expand_reference_points(reference_points)
        for layer in self.layers:
            src = layer(src, pos, reference_points, shapes, padding_mask)
        return src


def encoder_reference_points(shapes: Shapes, ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres of every level normalised by the valid region, expanded to all levels: (B, S, L, 2)."""
    refs = []
    device = ratios.device
    for lvl, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32) + 0.5,
                                torch.arange(w, device=device, dtype=torch.float32) + 0.5, indexing="ij")
        ry = ys.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)
        rx = xs.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((rx, ry), -1))
    return torch.cat(refs, 1)[:, :, None] * ratios[:, None]
