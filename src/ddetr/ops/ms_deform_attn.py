"""Multi-scale deformable attention (Eq. 2-3 of the paper): input checks, backend dispatch, reference path.

Layout (the official one): value (N, S, M, D); spatial_shapes (L, 2) as (H, W); level_start_index (L,);
sampling_locations (N, Lq, M, L, P, 2) normalised (x, y) in [0, 1]; attention_weights (N, Lq, M, L, P).
Returns (N, Lq, M*D). Sampling is bilinear with zeros outside the map and pixel coordinate = loc * size - 0.5
(``grid_sample`` with ``align_corners=False``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Shapes = list[tuple[int, int]]
BackendFn = Callable[[torch.Tensor, Shapes, torch.Tensor, torch.Tensor], torch.Tensor]

# name -> (available(value) -> bool, implementation). "reference" always exists; fused paths register here.
_BACKENDS: dict[str, tuple[Callable[[torch.Tensor], bool], BackendFn]] = {}
# Order in which ``backend="auto"`` tries the fused paths before falling back to the reference.
_AUTO_ORDER: list[str] = []


def register_backend(name: str, available: Callable[[torch.Tensor], bool], fn: BackendFn,
                     auto: bool = True) -> None:
    """Add a backend; ``auto`` backends are tried in registration order by ``backend="auto"``."""
    _BACKENDS[name] = (available, fn)
    if auto and name not in _AUTO_ORDER:
        _AUTO_ORDER.append(name)


def available_backends(value: torch.Tensor | None = None) -> list[str]:
    """Backends that can run on ``value``'s device (all registered ones if ``value`` is None)."""
    probe = value if value is not None else torch.empty(0)
    return [name for name, (ok, _) in _BACKENDS.items() if value is None or ok(probe)]


def capturing() -> bool:
    """A graph is being recorded (tracing, ONNX export, torch.compile): paths chosen from runtime state, or made of
    ops without export rules, step aside for the plain ones."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def as_shape_list(spatial_shapes: torch.Tensor | Sequence[Sequence[int]]) -> Shapes:
    """(L, 2) tensor or sequence of (H, W) -> list of int pairs (static shapes, friendly to compile/export)."""
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(f"spatial_shapes must have shape (L, 2), got {tuple(spatial_shapes.shape)}")
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return [(spatial_shapes[i, 0], spatial_shapes[i, 1]) for i in range(spatial_shapes.shape[0])]
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    shapes = [tuple(s) for s in spatial_shapes]
    if any(len(s) != 2 for s in shapes):
        raise ValueError("spatial_shapes must be a sequence of (H, W) pairs")
    return [(h, w) for h, w in shapes]


def _check(value: torch.Tensor, shapes: Shapes, level_start_index: torch.Tensor | None,
           loc: torch.Tensor, attn: torch.Tensor) -> None:
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, D), got shape {tuple(value.shape)}")
    if loc.dim() != 6 or loc.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be (N, Lq, M, L, P, 2), got shape {tuple(loc.shape)}")
    if attn.dim() != 5:
        raise ValueError(f"attention_weights must be (N, Lq, M, L, P), got shape {tuple(attn.shape)}")
    n, s, m, _ = value.shape
    if tuple(loc.shape[:-1]) != tuple(attn.shape):
        raise ValueError(f"sampling_locations {tuple(loc.shape)} and attention_weights {tuple(attn.shape)} "
                         "disagree")
    if loc.shape[0] != n or loc.shape[2] != m:
        raise ValueError(f"batch/head dims of sampling_locations {tuple(loc.shape)} do not match "
                         f"value {tuple(value.shape)}")
    if loc.shape[3] != len(shapes):
        raise ValueError(f"sampling_locations has {loc.shape[3]} levels but spatial_shapes has {len(shapes)}")
    if isinstance(shapes[0][0], int):
        if any(h <= 0 or w <= 0 for h, w in shapes):
            raise ValueError(f"spatial_shapes must be positive, got {shapes}")
        total = sum(h * w for h, w in shapes)
        if total != s:
            raise ValueError(f"spatial_shapes cover {total} positions but value has S={s}")
        if level_start_index is not None and level_start_index.device.type == "cpu" and not torch.jit.is_tracing():
            starts, acc = [], 0
            for h, w in shapes:
                starts.append(acc)
                acc += h * w
            if level_start_index.tolist() != starts:
                raise ValueError(f"level_start_index {level_start_index.tolist()} does not match "
                                 f"spatial_shapes ({starts})")
    for name, t in (("value", value), ("sampling_locations", loc), ("attention_weights", attn)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half types are accumulated in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def ms_deform_attn_reference(value: torch.Tensor, shapes: Shapes, loc: torch.Tensor,
                             attn: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch path: one ``grid_sample`` per level, weighted and accumulated level by level."""
    n, _, m, d = value.shape
    lq, p = loc.shape[1], loc.shape[4]
    ct = compute_dtype(value, loc, attn)
    grids = (2 * loc.to(ct) - 1).transpose(1, 2)  # (N, M, Lq, L, P, 2)
    weights = attn.to(ct).transpose(1, 2)  # (N, M, Lq, L, P)
    out = None
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].to(ct).permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].reshape(n * m, lq, p, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (NM, D, Lq, P)
        term = torch.matmul(sampled.transpose(1, 2), weights[:, :, :, lvl].reshape(n * m, lq, p, 1))  # (NM, Lq, D, 1)
        out = term if out is None else out + term
        start = start + h * w
    return out.reshape(n, m, lq, d).transpose(1, 2).reshape(n, lq, m * d).to(value.dtype)


register_backend("reference", lambda v: True, ms_deform_attn_reference, auto=False)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention core (no projections). See the module docstring for the layout.

    ``backend`` is "auto" (the fastest path available for the inputs' device), "reference", or the name of
    a registered fused backend ("cpu", "triton"); asking for one that cannot run raises ``ValueError``.
    """
    shapes = as_shape_list(spatial_shapes)
    _check(value, shapes, level_start_index, sampling_locations, attention_weights)
    if backend == "auto":
        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        name = "reference"
        if not exporting:
            for candidate in _AUTO_ORDER:
                if _BACKENDS[candidate][0](value):
                    name = candidate
                    break
    else:
        name = backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; registered: {sorted(_BACKENDS)}")
    ok, fn = _BACKENDS[name]
    if not ok(value):
        raise ValueError(f"backend {name!r} cannot run on {value.device.type} tensors here")
    return fn(value, shapes, sampling_locations, attention_weights)
