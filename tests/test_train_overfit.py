"""End to end: a tiny Deformable DETR memorises a handful of synthetic images and then detects their boxes."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

from ddetr.models import build, preset

COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.9]])  # class 0, 1, 2
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
SIZE = 64


def synthetic_batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """``n`` grey images with 1-3 non-overlapping coloured rectangles; targets in normalised cxcywh."""
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n):
        img = torch.full((3, SIZE, SIZE), 0.5)
        boxes, labels = [], []
        cells = torch.randperm(4, generator=gen)[: 1 + i % 3]  # one rectangle per image quadrant at most
        for cell in cells.tolist():
            x0 = (cell % 2) * 32 + int(torch.randint(0, 8, (1,), generator=gen))
            y0 = (cell // 2) * 32 + int(torch.randint(0, 8, (1,), generator=gen))
            w, h = (int(v) for v in torch.randint(12, 24, (2,), generator=gen))
            label = int(torch.randint(0, 3, (1,), generator=gen))
            img[:, y0:y0 + h, x0:x0 + w] = COLOURS[label, :, None, None]
            boxes.append([(x0 + w / 2) / SIZE, (y0 + h / 2) / SIZE, w / SIZE, h / SIZE])
            labels.append(label)
        images.append((img - MEAN[:, None, None]) / STD[:, None, None])
        targets.append({"labels": torch.tensor(labels), "boxes": torch.tensor(boxes)})
    return torch.stack(images), targets


def test_tiny_model_overfits_synthetic_images() -> None:
    """60 AdamW steps (~10 s on two idle cores): the loss drops >10x, the top detections are the objects."""
    torch.manual_seed(0)
    cfg = preset("deformable-detr", backbone="resnet18", pretrained_backbone="none", frozen_batchnorm=False,
                 hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=128, num_queries=12,
                 num_classes=3, dropout=0.0)
    model, criterion, postprocess = build(cfg)
    images, targets = synthetic_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    losses = []
    model.train()
    for _ in range(60):
        loss = criterion(model(images), targets)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # the official clipping
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])

    model.eval()
    with torch.no_grad():
        results = postprocess(model(images), torch.tensor([[SIZE, SIZE]] * len(images)))
    for result, target in zip(results, targets):
        gt_xyxy = torch.cat([target["boxes"][:, :2] - target["boxes"][:, 2:] / 2,
                             target["boxes"][:, :2] + target["boxes"][:, 2:] / 2], 1) * SIZE
        top = slice(0, len(target["labels"]))  # as many detections as objects, highest scores first
        iou = box_iou(gt_xyxy, result["boxes"][top])
        same_label = target["labels"][:, None] == result["labels"][top][None]
        assert ((iou > 0.5) & same_label).any(1).all(), (iou, same_label, result["scores"][top])

