"""High-level inference: load a checkpoint once, pass images in any common form, get torchvision-style detections."""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ddetr.data.collate import collate
from ddetr.data.images import open_rgb, to_rgb
from ddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resized_size
from ddetr.engine.device import AMP_DTYPES, resolve_amp
from ddetr.interop.meta import label_meta
from ddetr.models.deformable_detr import DeformableDETR
from ddetr.models.inference_ready import prepare_for_inference
from ddetr.models.postprocess import PostProcess

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


def read_image(path: str | Path) -> Image.Image:
    """Open an image file as the RGB a user sees (16-bit, palette, CMYK... converted), one-line error if unusable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    return open_rgb(path)


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
        return TF.pil_to_tensor(to_rgb(image))
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


@dataclass
class FileResult:
    """One file of `Detector.predict_files`: its detections, or the one-line reason it could not be read."""

    path: Path
    image: Image.Image | None
    detections: dict[str, Any] | None
    error: str | None = None


class Detector:
    """``Detector.from_checkpoint(path)(images)`` -> per image ``boxes`` (xyxy pixels of the original image),
    ``scores``, ``labels`` (the model's class indices), ``category_ids`` (the dataset's ids of those labels) and
    ``names``, all from the mapping stored with the model (`ddetr.interop.meta`).

    The detector runs a copy of ``model`` prepared for inference (`prepare_for_inference`: BatchNorm folded,
    channels_last), so the model passed in stays trainable. ``amp``: "none" (fp32), "bf16", "fp16" or "auto"
    (bf16 where the hardware has it), as ``--amp`` of predict and eval."""

    def __init__(self, model: DeformableDETR | Callable, meta: dict[str, Any], top_k: int = 100,
                 device: str | torch.device = "cpu", size: int | None = None, max_size: int | None = None,
                 amp: str = "none") -> None:
        self.device = torch.device(device)
        self.amp_dtype = AMP_DTYPES[resolve_amp(amp, self.device)]
        if isinstance(model, DeformableDETR) and not getattr(model, "inference_only", False):
            model = prepare_for_inference(copy.deepcopy(model))
        self.model = model.to(self.device).eval() if isinstance(model, torch.nn.Module) else model
        self.class_names: list[str] = list(meta["class_names"])
        self.category_ids: list[int] = list(meta["category_ids"])
        self.size, self.max_size = size or meta["val_size"], max_size or meta["max_size"]
        self.postprocess = PostProcess(top_k)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", size: int | None = None,
                        max_size: int | None = None, amp: str = "none", **hints: Any) -> Detector:
        """Our checkpoints, official .pth files and Hugging Face model folders; ``hints`` as `load_model`'s."""
        from ddetr.interop import load_model

        model, cfg, meta = load_model(path, **hints)
        return cls(prepare_for_inference(model), meta, cfg.top_k, device, size, max_size, amp)

    @classmethod
    def from_onnx(cls, path: str | Path, size: int | None = None, max_size: int | None = None) -> Detector:
        """The network runs in onnxruntime (exported without in-graph post-processing); labels, ids, names and the
        inference size come from the file's metadata, as they came from the checkpoint it was exported from."""
        from ddetr.export.onnx import OnnxDetector

        runner = OnnxDetector(path)
        if runner.postprocess:
            raise ValueError(f"{path}: exported with --postprocess; export without it for `predict --onnx`")
        stored = runner.meta
        num_classes = len(stored["category_ids"] or stored["class_names"] or []) or (runner.config or {}).get(
            "num_classes", 91)
        meta = label_meta(num_classes, stored["class_names"], stored["category_ids"], stored["val_size"],
                          stored["max_size"], str(path))
        return cls(lambda images, masks: runner(images, masks), meta, runner.top_k, "cpu", size, max_size)

    @torch.no_grad()
    def __call__(self, images: ImageInput | Sequence[ImageInput], threshold: float = 0.0,
                 batch_size: int = 4) -> dict[str, Any] | list[dict[str, Any]]:
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        results: list[dict[str, Any]] = []
        for i in range(0, len(items), batch_size):
            results += self._detect([to_uint8_tensor(x) for x in items[i:i + batch_size]], threshold)
        return results[0] if single else results

    def _detect(self, raw: list[torch.Tensor], threshold: float) -> list[dict[str, Any]]:
        batch = [(preprocess(x, self.size, self.max_size), {}) for x in raw]
        return self._detect_batch(batch, [tuple(x.shape[-2:]) for x in raw], threshold)

    @torch.no_grad()
    def _detect_batch(self, batch: list[tuple[torch.Tensor, dict]], sizes: list[tuple[int, int]],
                      threshold: float) -> list[dict[str, Any]]:
        pixels, masks, _ = collate(batch)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            outputs = self.model(pixels.to(self.device), masks.to(self.device))
        outputs = {k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}
        out = []
        for det in self.postprocess(outputs, torch.tensor(sizes, device=self.device), threshold or None):
            det = {k: v.cpu() for k, v in det.items()}
            labels = det["labels"].tolist()
            det["category_ids"] = torch.tensor([self.category_ids[lab] for lab in labels], dtype=torch.int64)
            det["names"] = [self.class_names[lab] for lab in labels]
            out.append(det)
        return out

    def predict_files(self, paths: Sequence[Path], threshold: float = 0.0, batch_size: int = 4,
                      workers: int = 2) -> Iterator[FileResult]:
        """Detections of image files in order, batched, decoded and resized by ``workers`` background threads while
        the model runs; a file that cannot be read yields its error and the others go on."""

        def load(path: Path) -> tuple[Image.Image, torch.Tensor, tuple[int, int]] | str:
            try:
                image = read_image(path)
            except (ValueError, FileNotFoundError) as exc:
                return str(exc)
            pixels = to_uint8_tensor(image)
            return image, preprocess(pixels, self.size, self.max_size), (image.height, image.width)

        ahead = max(workers, 1) + 2 * batch_size  # decoded images held at most: bounded memory on big folders
        with ThreadPoolExecutor(max(workers, 1)) as pool:
            futures = deque(pool.submit(load, p) for p in paths[:ahead])
            pending: list[tuple[Path, Any]] = []
            for i, path in enumerate(paths):
                item = futures.popleft().result()
                if i + ahead < len(paths):
                    futures.append(pool.submit(load, paths[i + ahead]))
                pending.append((path, item))
                if len(pending) == batch_size:
                    yield from self._flush(pending, threshold)
                    pending = []
            yield from self._flush(pending, threshold)

    def _flush(self, pending: list[tuple[Path, Any]], threshold: float) -> Iterator[FileResult]:
        good = [item for _, item in pending if not isinstance(item, str)]
        dets = iter(self._detect_batch([(x, {}) for _, x, _ in good], [s for _, _, s in good], threshold)
                    if good else [])
        for path, item in pending:  # in order: an unreadable file yields its error, the others their detections
            if isinstance(item, str):
                yield FileResult(path, None, None, item)
            else:
                yield FileResult(path, item[0], next(dets))
