"""ddetr: Deformable DETR for PyTorch."""
