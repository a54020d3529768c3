"""ONNX export (dynamic batch and image size, GridSample sampling) and an onnxruntime-backed detector.

The export uses PyTorch's TorchScript-based exporter: while tracing, feature-map sizes are traced values, so the
spatial shapes, level start indices and the (W, H) normaliser of the deformable attention stay dynamic, and the
sampling runs through the reference ``grid_sample`` path (ONNX GridSample, opset >= 16). The torch.export-based
exporter cannot trace `MSDeformAttn.forward` today (it builds the normaliser with ``torch.stack`` of SymInts).

Graph inputs: ``images`` (B, 3, H, W) float32, ImageNet-normalised; ``masks`` (B, H, W) bool, True on padding;
with post-processing also ``target_sizes`` (B, 2) as (h, w). Outputs: ``logits`` (B, Q, C) and ``boxes``
(B, Q, 4; normalised cxcywh), or with post-processing ``scores``, ``labels``, ``boxes`` (B, K; xyxy pixels) for the
top K = min(top_k, Q*C) (query, class) pairs, as `ddetr.models.postprocess.PostProcess` without a threshold.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

OUTPUT_NAMES = {"logits": "pred_logits", "boxes": "pred_boxes"}


def _wrapper(model: Any, postprocess: bool, top_k: int) -> Any:
    """An nn.Module with tensor-only inputs and outputs around the detector (optionally with in-graph top-k)."""
    import torch
    from torch import nn

    from ddetr.models.postprocess import PostProcess

    class Exported(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.postprocess = PostProcess(top_k)

        def forward(self, images: torch.Tensor, masks: torch.Tensor, target_sizes: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, ...]:
            out = self.model(images, masks)
            logits, boxes = out["pred_logits"], out["pred_boxes"]
            if not postprocess:
                return logits, boxes
            scores, labels, xyxy, _ = self.postprocess.topk(logits, boxes, target_sizes)
            return scores, labels, xyxy

    return Exported().eval()


@contextmanager
def _reference_attention(model: Any):
    """Force the pure-PyTorch deformable attention (the only one ONNX can express) and eval mode, then restore."""
    from ddetr.models.deform_attn import MSDeformAttn

    modules = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    saved = [m.backend for m in modules]
    training = model.training
    for m in modules:
        m.backend = "reference"
    model.eval()
    try:
        yield
    finally:
        for m, backend in zip(modules, saved):
            m.backend = backend
        model.train(training)


def export_onnx(model: Any, path: str | Path, opset: int = 17, dynamic: bool = True, postprocess: bool = False,
                top_k: int = 100, sample_size: tuple[int, int] = (320, 416), meta: dict[str, Any] | None = None,
                ) -> Path:
    """Export a DeformableDETR to ONNX (see the module docstring for inputs and outputs); returns the path.

    ``sample_size`` (h, w) is the traced example. With ``dynamic`` the batch and image size are free; two-stage
    models need images that give at least ``num_queries`` encoder tokens (true for any real image size). ``meta``
    (`ddetr.interop.meta.label_meta` keys: class names, category ids, inference size) is stored in the file.
    """
    import onnx
    import torch

    from ddetr.interop.meta import label_meta

    if opset < 16:
        raise ValueError(f"opset {opset} has no GridSample; use opset >= 16")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    h, w = sample_size
    images = torch.randn(2, 3, h, w, device=device)
    masks = torch.zeros(2, h, w, dtype=torch.bool, device=device)
    masks[1, h // 2:, w // 2:] = True
    args: tuple[torch.Tensor, ...] = (images, masks)
    inputs, outputs = ["images", "masks"], ["logits", "boxes"]
    if postprocess:
        args += (torch.tensor([[h, w], [h, w]], device=device),)
        inputs, outputs = inputs + ["target_sizes"], ["scores", "labels", "boxes"]
    axes = None
    if dynamic:
        axes = {"images": {0: "batch", 2: "height", 3: "width"}, "masks": {0: "batch", 1: "height", 2: "width"}}
        axes.update({name: {0: "batch"} for name in inputs[2:] + outputs})
    with _reference_attention(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(_wrapper(model, postprocess, top_k), args, str(path), dynamo=False,
                          opset_version=opset, input_names=inputs, output_names=outputs, dynamic_axes=axes)
    proto = onnx.load(str(path))
    cfg = getattr(model, "cfg", None)
    meta = meta or label_meta(model.cfg.num_classes)  # without stored labels: index = category id
    info = {"ddetr_postprocess": json.dumps(postprocess), "ddetr_top_k": json.dumps(top_k),
            "ddetr_config": json.dumps(dataclasses.asdict(cfg) if cfg is not None else None),
            **{f"ddetr_{k}": json.dumps(meta[k]) for k in ("class_names", "category_ids", "val_size", "max_size")}}
    for key, value in info.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


class OnnxDetector:
    """Run an exported model with onnxruntime; ``det(images, masks)`` -> ``pred_logits``/``pred_boxes`` (or the
    post-processed ``scores``/``labels``/``boxes`` when exported with ``postprocess``, given ``target_sizes``).

    Inputs are numpy arrays or torch tensors (results come back in the same kind); ``masks`` defaults to no
    padding. PyTorch is not needed when numpy arrays are passed.
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.postprocess = json.loads(meta.get("ddetr_postprocess", "false"))
        self.config: dict[str, Any] | None = json.loads(meta.get("ddetr_config", "null"))
        self.top_k: int = json.loads(meta.get("ddetr_top_k", "100"))
        # Labels and inference size as `ddetr.interop.meta.label_meta` gives them (None in files from before 0.2).
        self.meta = {k: json.loads(meta.get(f"ddetr_{k}", "null")) for k in
                     ("class_names", "category_ids", "val_size", "max_size")}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: Any, masks: Any = None, target_sizes: Any = None) -> dict[str, Any]:
        as_torch = type(images).__module__.startswith("torch")
        x = _numpy(images).astype(np.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {x.shape}")
        m = np.zeros((x.shape[0], *x.shape[2:]), dtype=bool) if masks is None else _numpy(masks).astype(bool)
        if m.shape != (x.shape[0], *x.shape[2:]):
            raise ValueError(f"masks must be (B, H, W) = {(x.shape[0], *x.shape[2:])}, got {m.shape}")
        feed = {"images": x, "masks": m}
        if self.postprocess:
            if target_sizes is None:
                raise ValueError("this model was exported with post-processing: pass target_sizes (B, 2) as (h, w)")
            feed["target_sizes"] = _numpy(target_sizes).astype(np.int64)
        results = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        if not self.postprocess:
            results = {OUTPUT_NAMES[k]: v for k, v in results.items()}
        if as_torch:
            import torch

            results = {k: torch.from_numpy(v) for k, v in results.items()}
        return results


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
