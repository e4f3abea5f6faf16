"""Merge an adapter into its base model and save a plain transformers directory."""

from __future__ import annotations

from pathlib import Path

from lorakit._io import atomic_directory


def merge_adapter(adapter: str | Path, output: str | Path, model: str | None = None, dtype="float32") -> Path:
    """Load the base in fp32, fold the adapter in (W + s·BA in fp32), cast to ``dtype`` and save
    model + tokenizer to ``output`` atomically. Returns ``output``."""
    from lorakit.inference.generate import load_for_inference
    from lorakit.models.load import resolve_dtype

    merged_model, tokenizer = load_for_inference(adapter, model, dtype="float32")
    merged = merged_model.merge_and_unload()
    merged.to(resolve_dtype(dtype))
    output = Path(output)
    with atomic_directory(output) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return output
