"""Datasets and loaders for training: deterministic per-sample augmentation, sharding, resumable order."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ddetr.data.coco import CocoDetection, DatasetError
from ddetr.data.collate import collate
from ddetr.data.transforms import train_transforms, val_transforms
from ddetr.engine import distributed as dist
from ddetr.engine.config import DataConfig


def resolve_paths(root: str | None, images: str | None, annotations: str | None, split: str) -> tuple[Path, Path]:
    """A dataset DIR means DIR/images + DIR/annotations.json; explicit paths win."""
    if root is None and (images is None or annotations is None):
        raise DatasetError(f"no {split} data: give a dataset DIR or both --{split}-images and --{split}-annotations")
    images_dir = Path(images) if images else Path(root) / "images"
    ann = Path(annotations) if annotations else Path(root) / "annotations.json"
    if not ann.is_file():
        raise DatasetError(f"{ann}: annotation file not found")
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: images folder not found")
    return images_dir, ann


def build_datasets(cfg: DataConfig) -> tuple[CocoDetection | None, CocoDetection | None]:
    train = val = None
    if cfg.train or cfg.train_annotations:
        imgs, ann = resolve_paths(cfg.train, cfg.train_images, cfg.train_annotations, "train")
        transforms = train_transforms(scales=cfg.scales, max_size=cfg.max_size, crop_scales=cfg.crop_scales,
                                      crop_size=cfg.crop_size, crop=cfg.crop)
        train = CocoDetection(imgs, ann, transforms, cfg.skip_bad, allow_empty=cfg.allow_empty)
    if cfg.val or cfg.val_annotations:
        imgs, ann = resolve_paths(cfg.val, cfg.val_images, cfg.val_annotations, "val")
        # Validation images without any boxes are fine (AP is then NaN), no images at all is not.
        val = CocoDetection(imgs, ann, val_transforms(size=cfg.val_size, max_size=cfg.max_size), cfg.skip_bad,
                            allow_empty=True)
        if not len(val):
            raise DatasetError(f"{ann}: no images to validate on")
    return train, val


class SeededDataset(Dataset):
    """Seeds sample i's augmentation in epoch e from (seed, e, i): the same whatever the workers or resume point."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        key = hashlib.blake2b(f"{self.seed}/{self.epoch}/{index}".encode(), digest_size=8).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(key, "little") & ((1 << 63) - 1))
            return self.dataset[index]


class EpochSampler(Sampler[int]):
    """This rank's shuffled (or ordered) indices for an epoch, optionally skipping the first ``skip`` of them.

    Training shards are padded to equal length across ranks (as DistributedSampler); evaluation shards are not.
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0, pad: bool = True) -> None:
        self.size, self.shuffle, self.seed, self.pad = size, shuffle, seed, pad
        self.epoch, self.skip = 0, 0

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        world, rank = dist.world_size(), dist.rank()
        if self.pad and world > 1:
            total = -(-self.size // world) * world
            order = (order * (total // max(len(order), 1) + 1))[:total]
        return order[rank::world][self.skip:]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int) -> DataLoader:
    sampler = EpochSampler(len(dataset), shuffle, seed, pad=shuffle)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, persistent_workers=False)
