"""High-level inference: load a checkpoint once, pass images in any common form, get torchvision-style detections."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from ddetr.data.collate import collate
from ddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resized_size
from ddetr.models.deformable_detr import DeformableDETR
from ddetr.models.postprocess import PostProcess

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def read_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with a one-line error naming the file if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: cannot read image ({exc.__class__.__name__})") from None


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand folders into their image files (sorted); plain files are kept as given."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            out += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(item)
    return out


def to_uint8_tensor(image: ImageInput) -> torch.Tensor:
    """Path / PIL / HxWx3 array / 3xHxW tensor (uint8 or float in [0, 1]) -> 3xHxW uint8 tensor."""
    if isinstance(image, (str, Path)):
        image = read_image(image)
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"array images must be HxWx3, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"tensor images must be 3xHxW, got shape {tuple(image.shape)}")
        if image.is_floating_point():
            image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        return image.to(torch.uint8)
    raise TypeError(f"unsupported image type {type(image).__name__}")


def preprocess(image: torch.Tensor, size: int, max_size: int) -> torch.Tensor:
    """uint8 3xHxW -> resized (shorter side `size`, longer <= `max_size`), ImageNet-normalised float tensor."""
    h, w = image.shape[-2:]
    image = TF.resize(image, list(resized_size(h, w, size, max_size)), antialias=True)
    return TF.normalize(image.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)


class Detector:
    """``Detector.from_checkpoint(path)(images)`` -> per image ``boxes`` (xyxy pixels), ``scores``, ``labels``,
    and ``names`` when the checkpoint knows its classes."""

    def __init__(self, model: DeformableDETR | Callable, class_names: Sequence[str] | None = None,
                 category_ids: Sequence[int] | None = None, size: int = 800, max_size: int = 1333,
                 top_k: int = 100, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval() if isinstance(model, torch.nn.Module) else model
        self.class_names = list(class_names) if class_names else None
        self.category_ids = list(category_ids) if category_ids else None
        self.size, self.max_size = size, max_size
        self.postprocess = PostProcess(top_k)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", **kwargs: Any) -> Detector:
        """Our checkpoints, official .pth files and Hugging Face model folders all work."""
        from ddetr.interop import load_model

        model, cfg, meta = load_model(path)
        kwargs.setdefault("top_k", cfg.top_k)
        if "size" not in kwargs and meta.get("val_size"):
            kwargs["size"] = meta["val_size"]
        if "max_size" not in kwargs and meta.get("max_size"):
            kwargs["max_size"] = meta["max_size"]
        return cls(model, meta.get("class_names"), meta.get("category_ids"), device=device, **kwargs)

    @classmethod
    def from_onnx(cls, path: str | Path, **kwargs: Any) -> Detector:
        """The network runs in onnxruntime (exported without in-graph post-processing); the rest is as above."""
        from ddetr.export.onnx import OnnxDetector

        runner = OnnxDetector(path)
        if runner.postprocess:
            raise ValueError(f"{path}: exported with --postprocess; export without it for `predict --onnx`")
        cfg = runner.config or {}
        kwargs.setdefault("top_k", cfg.get("top_k", 100))
        return cls(lambda images, masks: runner(images, masks), runner.class_names, **kwargs)

    @torch.no_grad()
    def __call__(self, images: ImageInput | Sequence[ImageInput], threshold: float = 0.0,
                 batch_size: int = 4) -> list[dict[str, Any]]:
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        results: list[dict[str, Any]] = []
        for i in range(0, len(items), batch_size):
            raw = [to_uint8_tensor(x) for x in items[i:i + batch_size]]
            batch = [(preprocess(x, self.size, self.max_size), {}) for x in raw]
            pixels, masks, _ = collate(batch)
            outputs = self.model(pixels.to(self.device), masks.to(self.device))
            sizes = torch.tensor([list(x.shape[-2:]) for x in raw], device=self.device)
            for det in self.postprocess(outputs, sizes):
                keep = det["scores"] > threshold
                det = {k: v[keep].cpu() for k, v in det.items()}
                if self.class_names:
                    det["names"] = [self.class_names[int(label)] for label in det["labels"]]
                results.append(det)
        return results[0] if single else results
