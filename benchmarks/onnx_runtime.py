"""ONNX Runtime vs PyTorch CPU inference of one preset, side by side in one process (same weights, same image).

    python benchmarks/onnx_runtime.py --preset deformable-detr --size 512 683 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ddetr.export.onnx import OnnxDetector, export_onnx
from ddetr.models import DeformableDETR, preset


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deformable-detr")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 683), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DeformableDETR(preset(args.preset).model).eval()
    h, w = args.size
    images, masks = torch.randn(1, 3, h, w), torch.zeros(1, h, w, dtype=torch.bool)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = export_onnx(model, Path(tmp) / "model.onnx", sample_size=(h, w))
        export_s = time.perf_counter() - t
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        runner = OnnxDetector(path)
        runner.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = model(images, masks)
            got = runner(images, masks)
            diff = max(float((got[k] - ref[k]).abs().max()) for k in ("pred_logits", "pred_boxes"))
            torch_med, torch_min = timed(lambda: model(images, masks), args.repeats)
        ort_med, ort_min = timed(lambda: runner(images, masks), args.repeats)
    backend = ddetr_backend(images)
    print(f"{args.preset} {h}x{w}, {args.threads} threads, export {export_s:.1f}s, max abs diff {diff:.1e}")
    print("| runtime | median s | min s |\n|---|---|---|")
    print(f"| PyTorch (ddetr, attention backend `{backend}`) | {torch_med:.2f} | {torch_min:.2f} |")
    print(f"| onnxruntime (GridSample decomposition) | {ort_med:.2f} | {ort_min:.2f} |")


def ddetr_backend(images: torch.Tensor) -> str:
    from ddetr.ops import available_backends

    names = [b for b in available_backends(images) if b != "reference"]
    return names[0] if names else "reference"


if __name__ == "__main__":
    main()
