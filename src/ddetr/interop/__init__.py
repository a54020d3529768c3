"""Pretrained-weight interop: load and save our, the official and the Hugging Face checkpoint layouts."""

from ddetr.interop.load import load_model, load_state_strict, read_checkpoint, save_ddetr, save_hf, save_official

__all__ = ["load_model", "load_state_strict", "read_checkpoint", "save_ddetr", "save_hf", "save_official"]
