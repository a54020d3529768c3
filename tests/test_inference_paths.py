"""The inference paths (issue #14) give the outputs of the layers as written and run only where nothing needs the
activations for a backward pass: the encoder doing everything after the sampling a chunk of pixels at a time, and
the decoder sampling the memory before projecting it (value_proj after the sampling)."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_
from test_model import randomise_box_heads, small

from ddetr.models import DeformableDETR
from ddetr.models.deform_attn import MSDeformAttn
from ddetr.models.encoder import EncoderLayer


@pytest.fixture
def chunk_calls(monkeypatch):
    """A tiny chunk (chunk edges inside images and a short last chunk), and a count of the layers run by the
    inference paths: ("encoder", layer) per chunked encoder layer, ("decoder", module) per unprojected sampling."""
    monkeypatch.setattr(EncoderLayer, "CHUNK", 37)
    calls = []

    def counting(inner, tag):
        def counted(self, *args):
            calls.append((tag, self))
            return inner(self, *args)
        return counted

    for cls, name, tag in ((EncoderLayer, "_forward_in_chunks", "encoder"),
                           (MSDeformAttn, "sample_unprojected", "decoder")):
        monkeypatch.setattr(cls, name, counting(getattr(cls, name), tag))
    return calls


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(2, 3, 80, 112)
    masks = torch.zeros(2, 80, 112, dtype=torch.bool)
    masks[1, 56:, :] = True
    masks[1, :, 72:] = True
    return images, masks


@pytest.mark.parametrize("name", ["deformable-detr", "deformable-detr-refine", "deformable-detr-two-stage",
                                  "deformable-detr-single-scale"])
def test_inference_paths_match_the_layers_as_written(name, chunk_calls, one_thread) -> None:
    torch.manual_seed(0)
    model = perturb_(DeformableDETR(small(name, enc_layers=2).model)).eval()
    randomise_box_heads(model)
    images, masks = padded_batch()
    with torch.enable_grad():  # autograd on: the whole-map path
        ref = model(images, masks)
    assert not chunk_calls
    with torch.no_grad():
        out = model(images, masks)
    # single scale at this size: 12 pixels per image, fewer than the samples of 12 queries: projecting is cheaper
    unprojected = 0 if name == "deformable-detr-single-scale" else 3
    assert [tag for tag, _ in chunk_calls] == ["encoder"] * 2 + ["decoder"] * unprojected
    for key in ("pred_logits", "pred_boxes"):
        assert (out[key] - ref[key]).abs().max() < 1e-5, key
    assert ref["pred_logits"].std() > 0.1 and ref["pred_boxes"].std() > 0.02  # not a vacuous comparison
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(images, masks)
    if model.cfg.two_stage:  # a discrete top-k: compare every pixel's proposal before the selection
        ref, low = ref["enc_outputs"], low["enc_outputs"]
    assert (low["pred_logits"].float() - ref["pred_logits"]).abs().max() < 0.1
    assert (low["pred_boxes"].float() - ref["pred_boxes"]).abs().max() < 0.04


def test_training_and_gradients_use_the_whole_map(chunk_calls) -> None:
    """Train mode (dropout), or eval with autograd (a saliency map), must keep the layer as written."""
    torch.manual_seed(0)
    model = DeformableDETR(small("deformable-detr", enc_layers=2).model)
    images, masks = padded_batch()
    model(images, masks)["pred_logits"].sum().backward()
    model.eval()
    images.requires_grad_(True)
    model(images, masks)["pred_logits"].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not chunk_calls
    with torch.inference_mode():
        model(images.detach(), masks)
    assert [tag for tag, _ in chunk_calls] == ["encoder"] * 2 + ["decoder"] * 3


def test_a_hook_on_a_bypassed_module_keeps_the_layer_as_written(chunk_calls) -> None:
    """The inference paths use some submodules through their weights; a hook on one of them must still see its call."""
    torch.manual_seed(0)
    model = DeformableDETR(small("deformable-detr", enc_layers=2).model).eval()
    images, masks = padded_batch()
    seen = []
    encoder_ffn = model.transformer.encoder.layers[1].linear1
    decoder_value = model.transformer.decoder.layers[0].cross_attn.value_proj
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append(mod)) for m in (encoder_ffn, decoder_value)]
    with torch.no_grad():
        hooked = model(images, masks)
    assert seen == [encoder_ffn, decoder_value]
    assert [tag for tag, _ in chunk_calls] == ["encoder"]  # layer 0 has no hook; layer 1 and the decoder as written
    for h in handles:
        h.remove()
    with torch.no_grad():
        plain = model(images, masks)
    assert (hooked["pred_boxes"] - plain["pred_boxes"]).abs().max() < 1e-5


def test_bench_predict_baseline_runs_the_layers_as_written(chunk_calls) -> None:
    """`ddetr bench predict` compares against ddetr 0.1's loop: its model must not take the inference paths."""
    from ddetr.bench.predict import layers_as_written

    torch.manual_seed(0)
    model = DeformableDETR(small("deformable-detr", enc_layers=2).model).eval()
    legacy = layers_as_written(model)
    images, masks = padded_batch()
    with torch.no_grad():
        old = legacy(images, masks)
        assert not chunk_calls
        new = model(images, masks)
    assert [tag for tag, _ in chunk_calls] == ["encoder"] * 2 + ["decoder"] * 3
    assert (old["pred_boxes"] - new["pred_boxes"]).abs().max() < 1e-5


def test_bf16_inference_path_keeps_locations_and_weights_in_fp32(chunk_calls) -> None:
    """Under bf16 autocast the encoder's path computes locations and softmax in fp32 (the references' dtype): a
    bf16 location is off by up to 0.4 px on a 167-px level. Compared with the layer as written in fp32."""
    from ddetr.models.deform_attn import recording

    torch.manual_seed(0)
    model = perturb_(DeformableDETR(small("deformable-detr", enc_layers=2).model)).eval()
    images, masks = padded_batch()
    with torch.enable_grad(), recording(model) as exact:
        model(images, masks)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), recording(model) as low:
        model(images, masks)
    assert [tag for tag, _ in chunk_calls][:2] == ["encoder"] * 2
    name = "transformer.encoder.layers.0.self_attn"
    assert low[name].sampling_locations.dtype == low[name].attention_weights.dtype == torch.float32
    # layer 0's inputs are the same up to bf16 rounding of the projections' operands
    assert (low[name].sampling_locations - exact[name].sampling_locations).abs().max() < 0.02
    assert (low[name].attention_weights.sum(-1).sum(-1) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("native", [True, False])
def test_bench_predict_prints_its_row_and_times_bf16_only_where_native(capsys, monkeypatch, one_thread, native):
    """One size, a few JPEGs: the row has the 0.1 loop, the fp32 predict loop and their ratio; bf16 is timed where the
    CPU computes it and shown as — elsewhere, saying why (emulated bf16 would time PyTorch's emulation)."""
    from ddetr.bench import predict as bench_predict
    monkeypatch.setattr(bench_predict, "native_bf16", lambda device: native)
    bench_predict.main(["--sizes", "64", "--images", "4", "--batch-size", "2", "--workers", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 64 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 6 and float(cells[1]) > 0 and float(cells[2]) > 0 and cells[3].endswith("x")
    assert (cells[4:] != ["—", "—"]) == native and ("bf16 not timed" in out) != native
