"""Deployment: ONNX export and onnxruntime inference (onnx/onnxruntime are imported only when used)."""

from ddetr.export.onnx import OnnxDetector, export_onnx

__all__ = ["OnnxDetector", "export_onnx"]
