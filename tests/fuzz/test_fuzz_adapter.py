"""Fuzzed adapter directories loaded onto a tiny base model.

Valid adapters of several methods are saved once; each case copies one and mutates it: config
values of the wrong type or range, unknown and missing keys, tensors with NaN / Inf, other
shapes, dtypes or names, missing and extra tensors, safetensors files truncated or with headers
that lie about sizes, dtypes and offsets (written as raw bytes: 8-byte little-endian header
length + JSON header + data), missing or misplaced files.

Property: ``load_adapter(base, dir)`` loads (and the adapted model runs a forward pass) or
raises LorakitError with one line; after a refusal the base model is unchanged (same modules,
parameters with the same values, same requires_grad). ``lorakit merge`` of such a directory
writes a complete model or refuses with one line and leaves nothing at --output (no file
half-written, no temporary directory left next to it).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from fuzz_common import counted, fuzz_settings, outcome, time_limit
from lorakit import LoraConfig, get_peft_model, load_adapter
from lorakit.adapters import AdaLoraConfig, BottleneckConfig
from lorakit.cli import main
from lorakit_tiny import save_tiny_llama
from tiny_models import sample_input_ids, tiny_model

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SOURCES = {  # name -> (architecture, config of the saved adapter)
    "lora": ("llama", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "dora": ("llama", lambda: LoraConfig(r=2, use_dora=True, target_modules=["k_proj", "down_proj"])),
    "lora_bias": ("llama", lambda: LoraConfig(r=3, target_modules="all-linear", layers_to_transform=[1],
                                              modules_to_save=["lm_head"])),
    "rslora_gpt2": ("gpt2", lambda: LoraConfig(r=4, use_rslora=True, target_modules=["c_attn"], bias="lora_only",
                                               rank_pattern={"c_attn": 2})),
    "adalora": ("llama", lambda: AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"])),
    "bottleneck": ("llama", lambda: BottleneckConfig(placement="houlsby", reduction_factor=8)),
}
DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "F99", "", 7]
TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.bool, torch.float8_e4m3fn]


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    """name -> (architecture, directory of a valid saved adapter)."""
    root = tmp_path_factory.mktemp("adapters")
    result = {}
    for name, (arch, make) in SOURCES.items():
        model = get_peft_model(tiny_model(arch, seed=1), make())
        with torch.no_grad():  # non-zero B / up weights: a loaded adapter changes the output
            for param_name, param in model.named_parameters():
                if param.requires_grad:
                    param.add_(0.01 * torch.randn_like(param))
        model.save_pretrained(root / name)
        result[name] = (arch, root / name)
    return result


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.integers(), st.floats(),
                         st.sampled_from(["", "LORA", "ADALORA", "BOTTLENECK", "q_proj", "all-linear", "none", "nan",
                                          "lora_only", "all", "gaussian", "pissa", "pissa_niter_2", "houlsby",
                                          "a\nb", ".*", "[", "(?P<", "^model.layers.0.self_attn.q_proj$"]),
                         st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.one_of(st.text(max_size=6), st.sampled_from(["q_proj", "v_proj", "c_attn"])),
                                           inner, max_size=3), max_leaves=6)
CONFIG_KEYS = ["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
               "layers_pattern", "bias", "use_rslora", "use_dora", "init_lora_weights", "fan_in_fan_out",
               "modules_to_save", "rank_pattern", "alpha_pattern", "init_r", "target_r", "total_step", "tinit",
               "tfinal", "deltaT", "beta1", "orth_reg_weight", "placement", "reduction_factor", "non_linearity",
               "adapter_dropout", "init_weights", "inference_mode", "layer_replication", "unknown_key", "task_type"]


def _mutate_config(draw, directory: Path) -> None:
    path = directory / CONFIG
    kind = draw(st.integers(0, 9))
    if kind == 0:  # a file that is not an adapter config
        raw = draw(st.sampled_from([b"", b"{", b"[]", b"null", b"\xff\xfe{}", b'{"peft_type": "LORA"', b'"LORA"',
                                    b'{"peft_type": ["LORA"]}', b'{"peft_type": "LORA", "r": NaN}']))
        path.write_bytes(raw)
        return
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        return
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(data) + CONFIG_KEYS))
        if draw(st.integers(0, 4)) == 0:
            data.pop(key, None)
        else:
            data[key] = draw(json_values)
    path.write_text(json.dumps(data))


def _mutate_tensors(draw, directory: Path) -> None:
    path = directory / WEIGHTS
    tensors = load_file(str(path))
    names = sorted(tensors)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 7))
        name = draw(st.sampled_from(names)) if names else None
        if name is None or name not in tensors:
            continue
        tensor = tensors[name]
        if kind == 0 and tensor.numel():  # NaN / Inf somewhere
            flat = tensor.clone().reshape(-1)
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            tensors[name] = flat.reshape(tensor.shape)
        elif kind == 1:  # another shape
            shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=3))
            tensors[name] = torch.randn(shape) if shape else torch.tensor(1.0)
        elif kind == 2:
            tensors[name] = tensor.t().contiguous() if tensor.dim() == 2 else tensor.unsqueeze(0)
        elif kind == 3:
            del tensors[name]
        elif kind == 4:  # an extra or renamed tensor
            new = draw(st.sampled_from([name.replace("layers.0", "layers.7"), name.replace("lora_A", "lora_C"),
                                        name + ".extra", "base_model.model.lm_head.weight", "x", ""]))
            tensors[new] = tensors.pop(name) if draw(st.booleans()) else tensor.clone()
        elif kind == 5:
            tensors[name] = tensor.to(draw(st.sampled_from(TORCH_DTYPES)))
        elif kind == 6:
            tensors.clear()
        else:
            tensors[name] = tensor * draw(st.sampled_from([1e30, 0.0, -1.0, 1e-30]))
    save_file(tensors, str(path), metadata=draw(st.sampled_from([{"format": "pt"}, None, {"format": "tf"}])))


def _mutate_raw(draw, directory: Path) -> None:
    """Byte-level damage to the safetensors file, mostly to its header."""
    path = directory / WEIGHTS
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + size]), raw[8 + size:]
    kind = draw(st.integers(0, 6))
    if len(raw) < 2:
        return
    if kind == 0:
        path.write_bytes(raw[: draw(st.integers(0, len(raw) - 1))])
        return
    if kind == 1:
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        path.write_bytes(bytes(data))
        return
    if kind == 2:  # the length prefix lies
        fake = draw(st.sampled_from([0, 1, size - 1, size + 1, len(raw), 2**32, 2**63 - 1, 2**64 - 1]))
        path.write_bytes(struct.pack("<Q", fake) + raw[8:])
        return
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        if kind == 6 or not names:
            header[draw(st.sampled_from(["__metadata__", "extra", names[0] if names else "x"]))] = draw(json_values)
            continue
        entry = header[draw(st.sampled_from(names))]
        if not isinstance(entry, dict):
            continue
        if kind == 3:
            entry["dtype"] = draw(st.sampled_from(DTYPES))
        elif kind == 4:
            entry["shape"] = draw(st.one_of(st.lists(st.one_of(st.integers(0, 64), st.integers(-5, 2**64)), max_size=4),
                                            json_values))
        else:
            offsets = entry.get("data_offsets")
            ints = isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int for v in offsets)
            start, end = offsets if ints else (0, 0)
            entry["data_offsets"] = draw(st.one_of(
                st.sampled_from([[end, start], [start, end + 4], [0, 0], [start, len(body) + 8], [-4, end],
                                 [start, 2**64], [start], []]),
                st.lists(st.integers(0, len(body) + 16), min_size=2, max_size=2), json_values))
    text = json.dumps(header).encode()
    text += b" " * draw(st.integers(0, 7))  # safetensors pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def _mutate_files(draw, directory: Path) -> None:
    kind = draw(st.integers(0, 5))
    name = draw(st.sampled_from([CONFIG, WEIGHTS]))
    if kind == 0:
        (directory / name).unlink()
    elif kind == 1:  # a directory where a file should be
        (directory / name).unlink()
        (directory / name).mkdir()
    elif kind == 2:  # a legacy .bin instead of safetensors: pickled tensors, or junk
        tensors = load_file(str(directory / WEIGHTS))
        (directory / WEIGHTS).unlink()
        if draw(st.booleans()):
            torch.save(tensors, directory / "adapter_model.bin")
        else:
            (directory / "adapter_model.bin").write_bytes(draw(st.binary(max_size=64)))
    elif kind == 3:
        (directory / "stray.safetensors").write_bytes(b"junk")
    elif kind == 4:  # an empty file
        (directory / name).write_bytes(b"")
    else:  # a file of lorakit's other outputs next to (or instead of) the adapter
        (directory / draw(st.sampled_from(["config.json", "prompt_baseline.json"]))).write_text(
            draw(st.sampled_from(["{}", "{", '{"num_examples": 1, "seed": 0, "context": 3}', "[]"])))
        if draw(st.booleans()):
            (directory / CONFIG).unlink()


def _intact(directory: Path) -> bool:
    try:
        json.loads((directory / CONFIG).read_text())["peft_type"]
        load_file(str(directory / WEIGHTS))
        return True
    except Exception:  # anything unreadable: the mutation so far is enough
        return False


MUTATORS = [_mutate_config, _mutate_tensors, _mutate_raw, _mutate_files]


def _snapshot(model):
    return ([name for name, _ in model.named_modules()],
            {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()})


def check_adapter(saved_adapters, data) -> None:
    source = data.draw(st.sampled_from(sorted(SOURCES)), label="source")
    arch, original = saved_adapters[source]
    arch = data.draw(st.sampled_from([arch, arch, arch, "llama", "gpt2", "qwen2"]), label="base")
    with counted("adapter"), time_limit(30, "load_adapter"), tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "adapter"
        shutil.copytree(original, directory)
        for mutate in data.draw(st.lists(st.sampled_from(MUTATORS), min_size=0, max_size=2), label="mutations"):
            if _intact(directory):  # each mutation starts from files it can read
                mutate(data.draw, directory)
        base = tiny_model(arch)
        before = _snapshot(base)
        loaded, message = outcome(load_adapter, base, directory)
        if message is not None:
            modules, params = _snapshot(base)
            assert modules == before[0], f"refused ({message}) but the base model's modules changed"
            assert params.keys() == before[1].keys()
            for name, (value, grad) in params.items():
                assert torch.equal(value, before[1][name][0]), f"refused ({message}) but '{name}' changed"
                assert grad == before[1][name][1], f"refused ({message}) but '{name}'.requires_grad changed"
            return
        with torch.no_grad():
            loaded(input_ids=sample_input_ids())


@pytest.fixture(scope="module")
def merge_adapters(tmp_path_factory, smol_tokenizer):
    """Adapters (LoRA, DoRA, bottleneck) over a saved tiny Llama with a real tokenizer, which
    ``lorakit merge`` finds through their base_model_name_or_path."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("merge")
    base = save_tiny_llama(root / "base", smol_tokenizer)
    result = []
    for name, config in [("lora", LoraConfig(r=2, target_modules=["q_proj", "v_proj"])),
                         ("dora", LoraConfig(r=2, use_dora=True, target_modules=["o_proj"])),
                         ("bottleneck", BottleneckConfig())]:
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
        model.save_pretrained(root / name)
        result.append(root / name)
    return result


def check_merge(merge_adapters, data) -> None:
    original = data.draw(st.sampled_from(merge_adapters), label="adapter")
    with counted("adapter"), time_limit(60, "lorakit merge"), tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "adapter"
        shutil.copytree(original, directory)
        for mutate in data.draw(st.lists(st.sampled_from(MUTATORS), min_size=1, max_size=2), label="mutations"):
            if _intact(directory):
                mutate(data.draw, directory)
        output = Path(tmp) / "out" / "merged"
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(["merge", "--adapter", str(directory), "--output", str(output)])
        leftovers = sorted(p.name for p in output.parent.iterdir()) if output.parent.exists() else []
        if code == 0:
            assert (output / "config.json").is_file() and (output / "model.safetensors").is_file()
            assert leftovers == ["merged"], f"merged, and left {leftovers}"
            return
        lines = stderr.getvalue().strip().splitlines()
        assert code == 2 and lines and lines[-1].startswith("error: "), stderr.getvalue()
        assert not output.exists() and not leftovers, f"refused ({lines[-1]}) but left {leftovers} at --output"


# --- fast tier ------------------------------------------------------------------------------

@fuzz_settings(150)
@given(data=st.data())
def test_adapter_dirs_fast(saved_adapters, data):
    check_adapter(saved_adapters, data)


@fuzz_settings(15)
@given(data=st.data())
def test_merge_refusals_leave_no_output_fast(merge_adapters, data):
    check_merge(merge_adapters, data)


# --- long tier ------------------------------------------------------------------------------

@pytest.mark.long
@fuzz_settings(2500)
@given(data=st.data())
def test_adapter_dirs_long(saved_adapters, data):
    check_adapter(saved_adapters, data)


@pytest.mark.long
@fuzz_settings(300)
@given(data=st.data())
def test_merge_refusals_leave_no_output_long(merge_adapters, data):
    check_merge(merge_adapters, data)
