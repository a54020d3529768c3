"""Batch images of different sizes: zero-pad bottom/right and build the padding mask."""

from typing import Any

import torch


def collate(
    batch: list[tuple[torch.Tensor, dict[str, Any]]], size_divisibility: int = 1
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Stack (image, target) pairs into images (B,3,H,W), masks (B,H,W) True on padding, and the target list.

    H and W are the batch maxima rounded up to a multiple of `size_divisibility`. Use
    ``functools.partial(collate, size_divisibility=32)`` as a DataLoader ``collate_fn`` to change it.
    """
    if not batch:
        raise ValueError("collate: empty batch")
    if size_divisibility < 1:
        raise ValueError(f"collate: size_divisibility must be >= 1, got {size_divisibility}")
    images = [image for image, _ in batch]
    channels = images[0].shape[0]
    if any(im.dim() != 3 or im.shape[0] != channels for im in images):
        shapes = [tuple(im.shape) for im in images]
        raise ValueError(f"collate: images must all be (C,H,W) with the same C, got shapes {shapes}")
    height = max(im.shape[1] for im in images)
    width = max(im.shape[2] for im in images)
    height = -(-height // size_divisibility) * size_divisibility
    width = -(-width // size_divisibility) * size_divisibility
    padded = images[0].new_zeros((len(images), channels, height, width))
    masks = torch.ones((len(images), height, width), dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        padded[i, :, : im.shape[1], : im.shape[2]] = im
        masks[i, : im.shape[1], : im.shape[2]] = False
    return padded, masks, [target for _, target in batch]
