"""Datasets, augmentation, batching and the built-in synthetic dataset."""

from .coco import CocoDetection, DatasetError
from .collate import collate
from .images import ImageError, open_rgb, to_rgb
from .synthetic import generate as generate_synthetic
from .transforms import IMAGENET_MEAN, IMAGENET_STD, basic_transforms, resized_size, train_transforms, val_transforms

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CocoDetection",
    "DatasetError",
    "ImageError",
    "basic_transforms",
    "collate",
    "generate_synthetic",
    "open_rgb",
    "resized_size",
    "to_rgb",
    "train_transforms",
    "val_transforms",
]
