"""Parameter groups, AdamW and the step LR schedule."""

import pytest
import torch
from torch import nn

from ddetr.engine.config import OptimConfig
from ddetr.engine.optim import build_optimizer, build_scheduler, param_groups


class ToyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.sampling_offsets = nn.Linear(4, 8)
        self.value_proj = nn.Linear(4, 4)


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1))
        self.backbone[0].weight.requires_grad_(False)  # frozen stem, like the official ResNet
        self.transformer = nn.Module()
        self.transformer.reference_points = nn.Linear(4, 2)
        self.transformer.layers = nn.ModuleList([ToyAttention(), ToyAttention()])
        self.class_embed = nn.Linear(4, 3)
        self.query_embed = nn.Embedding(5, 8)


def _expected_group(name):
    if name.startswith("backbone."):
        return "backbone"
    if "reference_points" in name or "sampling_offsets" in name:
        return "linear_proj"
    return "main"


def test_each_trainable_parameter_in_exactly_one_group():
    model = ToyModel()
    groups = param_groups(model, OptimConfig(lr=1e-3, lr_backbone=3e-5, lr_linear_proj_mult=0.5))
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"main": 1e-3, "backbone": 3e-5, "linear_proj": pytest.approx(5e-4)}
    owner = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in owner, "parameter in two groups"
            owner[id(p)] = group["name"]
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert owner[id(p)] == _expected_group(name), name
        else:
            assert id(p) not in owner, f"frozen {name} given to the optimiser"
    assert len(owner) == sum(p.requires_grad for p in model.parameters())


def test_backbone_wins_over_linear_proj_names():
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.sampling_offsets = nn.Linear(2, 2)
    groups = {g["name"]: g["params"] for g in param_groups(model, OptimConfig())}
    assert len(groups["backbone"]) == 2 and not groups["linear_proj"] and not groups["main"]


def test_build_optimizer_and_scheduler():
    model = ToyModel()
    cfg = OptimConfig(lr_drop=2)
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-4, 2e-5, 2e-5])
    assert all(g["weight_decay"] == 1e-4 for g in optimizer.param_groups)
    scheduler = build_scheduler(optimizer, cfg.lr_drop)
    seen = []
    for _ in range(5):  # epochs 0..4: drops after epochs 2 and 4
        seen.append([g["lr"] for g in optimizer.param_groups])
        model.class_embed(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(seen[1]) and seen[2] == pytest.approx([x * 0.1 for x in seen[0]])
    assert seen[4] == pytest.approx([x * 0.01 for x in seen[0]])


def test_frozen_backbone_leaves_an_empty_group_that_still_steps():
    model = ToyModel()
    model.backbone.requires_grad_(False)
    optimizer = build_optimizer(model, OptimConfig())
    assert [len(g["params"]) for g in optimizer.param_groups][1] == 0
    model.class_embed(torch.randn(2, 4)).sum().backward()
    before = model.class_embed.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.class_embed.weight)


def test_errors():
    model = ToyModel().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, OptimConfig())
    with pytest.raises(ValueError, match="lr_drop must be >= 1"):
        build_scheduler(torch.optim.AdamW(nn.Linear(1, 1).parameters()), 0)


def test_fused_adamw_matches_the_reference_update_and_resumes_unfused_state():
    """The fused AdamW (CPU) takes the same steps as PyTorch's reference loop, per group lr and weight decay; a
    state saved by an unfused AdamW (older checkpoints) loads and keeps stepping."""
    torch.manual_seed(0)
    model = ToyModel()
    reference_model = ToyModel()
    reference_model.load_state_dict(model.state_dict())
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1))
    assert all(g["fused"] for g in optimizer.param_groups)
    reference = torch.optim.AdamW(param_groups(reference_model, OptimConfig(lr=1e-2)), weight_decay=0.1,
                                  foreach=False)
    x = torch.randn(2, 3, 6, 6)
    for _ in range(4):
        for m, opt in ((model, optimizer), (reference_model, reference)):
            m.class_embed(m.backbone(x).mean((2, 3))).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), reference_model.parameters()):
        assert (a - b).abs().max() < 1e-6, name
    moved = model.class_embed.weight - ToyModel().class_embed.weight
    assert moved.abs().max() > 1e-3  # the steps did move the weights

    resumed = build_optimizer(reference_model, OptimConfig(lr=1e-2, weight_decay=0.1))
    resumed.load_state_dict(reference.state_dict())
    reference_model.class_embed(torch.randn(2, 4)).sum().backward()
    before = reference_model.class_embed.weight.detach().clone()
    resumed.step()
    assert not torch.equal(before, reference_model.class_embed.weight)
