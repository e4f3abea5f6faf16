"""``export(...)``: what ``lorakit export`` does, in order, before writing anything big:

1. refuse an existing output (unless ``overwrite``) and an output inside the adapter or base;
2. load base + adapter (fp32), refusing an adapter made on another base (unless ``force``);
3. ``gguf``: merge (W + s·BA in fp32) and write the model with its tokenizer and chat template;
   ``gguf-adapter``: write the adapter's low-rank factors in llama.cpp's adapter layout;
4. write an Ollama ``Modelfile`` next to the GGUF (FROM, TEMPLATE, SYSTEM, stop, num_ctx).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit._io import check_output_target, write_text_atomic
from lorakit.errors import LorakitError

FORMATS = ("gguf", "gguf-adapter")
MODELFILE = "Modelfile"


@dataclass
class ExportResult:
    path: Path
    modelfile: Path
    template_note: str | None  # why the Modelfile has no TEMPLATE, or None


def base_gguf_file(base: str) -> Path | None:
    """The GGUF file a base model was loaded from (the built-in alias or a .gguf path), or None."""
    from lorakit.models.load import BUILTIN_MODELS, builtin_gguf_path

    if base in BUILTIN_MODELS:
        return builtin_gguf_path(base)
    path = Path(base).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def export(adapter: str | Path, output: str | Path, fmt: str = "gguf", quant: str = "f16", model: str | None = None,
           overwrite: bool = False, force: bool = False) -> ExportResult:
    from lorakit.export.gguf_layout import architecture_of
    from lorakit.inference.generate import adapter_base_model, load_for_inference
    from lorakit.inference.merge import local_inputs

    if fmt not in FORMATS:
        raise LorakitError(f"--format must be one of {', '.join(FORMATS)}, not '{fmt}'")
    output = Path(output)
    if output.suffix != ".gguf":
        raise LorakitError(f"--output must name a .gguf file, not '{output}'")
    inputs = local_inputs(adapter, model)
    check_output_target(output, overwrite, inputs=inputs, what="output")
    modelfile_path = check_output_target(output.parent / MODELFILE, overwrite, inputs=inputs, what="Modelfile")
    base = model if model is not None else adapter_base_model(adapter)
    loaded, tokenizer = load_for_inference(adapter, base, dtype="float32", check_base=not force)
    architecture_of(loaded.model)  # refuse an unsupported architecture before any work
    base_file = base_gguf_file(base)
    if fmt == "gguf":
        written = _write_model(loaded, tokenizer, output, quant, base, base_file)
        from_line, adapter_line = f"./{output.name}", None
    else:
        from lorakit.export.gguf_adapter import write_gguf_adapter

        written = write_gguf_adapter(adapter, loaded.model, output)
        from_line = str(base_file) if base_file else f"<the base model {base} as a GGUF file>"
        adapter_line = f"./{output.name}"
    template_note = _write_modelfile(modelfile_path, from_line, adapter_line, tokenizer, loaded.model.config)
    return ExportResult(path=written, modelfile=modelfile_path, template_note=template_note)


def _write_model(loaded, tokenizer, output: Path, quant: str, base: str, base_file: Path | None) -> Path:
    from lorakit.export.gguf_model import QUANTS, write_gguf_model
    from lorakit.export.gguf_tokenizer import gguf_tokenizer, pre_tokenizer_of_gguf

    if quant not in QUANTS:
        raise LorakitError(f"--quant must be one of {', '.join(QUANTS)}, not '{quant}'")
    merged = loaded.merge_and_unload()
    pre = pre_tokenizer_of_gguf(base_file) if base_file else None
    meta = gguf_tokenizer(tokenizer, merged.config.vocab_size, merged.config.model_type, pre=pre)
    return write_gguf_model(merged, meta, output, quant=quant, name=f"{Path(base).stem} + {output.stem}")


def _write_modelfile(path: Path, from_line: str, adapter_line: str | None, tokenizer, config) -> str | None:
    from lorakit.export.ollama import ChatFormat, TemplateNotTranslatable, modelfile

    note = None
    try:
        fmt = ChatFormat.from_tokenizer(tokenizer) if getattr(tokenizer, "chat_template", None) else None
        if fmt is None:
            note = "the tokenizer has no chat template"
    except TemplateNotTranslatable as err:
        fmt, note = None, f"the chat template does not translate to Ollama's ({err})"
    write_text_atomic(path, modelfile(from_line, fmt, tokenizer.eos_token, config.max_position_embeddings,
                                      adapter_line=adapter_line, template_note=note))
    return note
