"""Datasets, augmentation, batching and the built-in synthetic dataset."""

from .coco import CocoDetection, DatasetError
from .collate import collate
from .synthetic import generate as generate_synthetic
from .transforms import IMAGENET_MEAN, IMAGENET_STD, basic_transforms, resized_size, train_transforms, val_transforms

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CocoDetection",
    "DatasetError",
    "basic_transforms",
    "collate",
    "generate_synthetic",
    "resized_size",
    "train_transforms",
    "val_transforms",
]
