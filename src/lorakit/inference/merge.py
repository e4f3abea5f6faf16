"""Merge an adapter into its base model and save a plain transformers directory."""

from __future__ import annotations

from pathlib import Path

from lorakit._io import atomic_directory, check_output_target


def merge_adapter(adapter: str | Path, output: str | Path, model: str | None = None, dtype="float32",
                  overwrite: bool = False, force: bool = False) -> Path:
    """Load the base in fp32, fold the adapter in (W + s·BA in fp32), cast to ``dtype`` and save
    model + tokenizer to ``output`` atomically. Returns ``output``.

    An adapter whose base fingerprint records another base model is refused (one line saying
    what differs) unless ``force``: merged into the wrong weights it would make a broken model.

    An existing file or non-empty directory at ``output`` is refused unless ``overwrite``; an
    ``output`` that is, lies inside or contains the adapter directory or a local base model is
    always refused. Both checks run before anything is loaded."""
    from lorakit.inference.generate import load_for_inference
    from lorakit.models.load import resolve_dtype

    output = check_output_target(output, overwrite, inputs=local_inputs(adapter, model), what="output")
    merged_model, tokenizer = load_for_inference(adapter, model, dtype="float32", check_base=not force)
    merged = merged_model.merge_and_unload()
    merged.to(resolve_dtype(dtype))
    with atomic_directory(output) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return output


def local_inputs(adapter: str | Path, model: str | None) -> list[Path]:
    """The paths a merge reads: the adapter directory and the base model when it is local."""
    from lorakit.inference.generate import adapter_base_model

    base = model if model is not None else adapter_base_model(adapter)
    return [Path(adapter)] + ([Path(base)] if Path(base).exists() else [])
