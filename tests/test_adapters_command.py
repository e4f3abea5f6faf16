"""lorakit adapters list / diff / check on tiny adapters: the table's contents, distances that
equal the materialised ΔW's, and check failing (exit 1, one line per problem) on a truncated
file, NaN, inconsistent shapes or another base."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model

sys.path.insert(0, str(Path(__file__).parent / "training"))
from lorakit_tiny import save_tiny_llama  # noqa: E402

from lorakit import AdaLoraConfig, LoraConfig, get_peft_model  # noqa: E402
from lorakit.adapters import get_method  # noqa: E402
from lorakit.cli import main  # noqa: E402
from lorakit.inference.adapter_diff import diff_adapters  # noqa: E402
from lorakit.inference.adapter_tools import module_tables  # noqa: E402

Q0 = "model.layers.0.self_attn.q_proj"
WEIGHTS = "adapter_model.safetensors"


def _save(directory: Path, config, seed: int = 0, base=None) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(base if base is not None else tiny_model("llama"), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(directory)
    return directory


@pytest.fixture()
def root(tmp_path):
    """a/ (r 4, q v), b/ (r 8, q k, rsLoRA, per-module alpha), runs/c/ (AdaLoRA) and a checkpoint."""
    _save(tmp_path / "a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "eval_loss": 2.5}\n'
                                                  '{"step": 4, "eval_loss": 1.25}\n{"step": 5, "lo')
    _save(tmp_path / "b", LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj"],
                                     alpha_pattern={"k_proj": 4}), seed=1)
    (tmp_path / "b" / "README.md").write_text("# b\n- final eval loss: 0.8125 (perplexity 2.2535)\n")
    _save(tmp_path / "runs" / "c", AdaLoraConfig(init_r=6, target_r=2, total_step=10, target_modules=["q_proj"]))
    _save(tmp_path / "runs" / "checkpoint-2", LoraConfig(r=2, target_modules=["o_proj"]))
    return tmp_path


def _delta(directory: Path, module: str) -> torch.Tensor:
    """ΔW of one module materialised the plain way, from the loaded model's layer."""
    from lorakit import load_adapter

    model = load_adapter(tiny_model("llama"), directory)
    return model.model.get_submodule(module).get_delta_weight("default").double()


# --- list ------------------------------------------------------------------------------------
def test_list_shows_every_adapter_with_method_rank_targets_base_size_and_eval_loss(root, capsys):
    assert main(["adapters", "list", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ADAPTER", "METHOD", "RANK", "TARGETS", "BASE", "BASE", "FP", "SIZE", "EVAL", "LOSS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"a", "b", "runs/c", "runs/checkpoint-2"}
    assert rows["a"][1:4] == ["lora", "4", "q_proj,v_proj"] and rows["a"][-1] == "1.25"  # last eval row
    assert rows["b"][1:4] == ["lora", "8", "k_proj,q_proj"] and rows["b"][-1] == "0.8125"  # the model card
    assert rows["runs/c"][1:4] == ["adalora", "6", "q_proj"] and rows["runs/c"][-1] == "-"
    assert len({row[5] for row in rows.values()}) == 1 and rows["a"][5] != "-"  # one base fingerprint for all

    assert main(["adapters", "list", str(root), "--json"]) == 0
    data = {row["path"]: row for row in json.loads(capsys.readouterr().out)}
    assert data["a"]["size_bytes"] == sum((root / "a" / n).stat().st_size for n in (WEIGHTS, "adapter_config.json"))
    assert data["runs/checkpoint-2"]["targets"] == ["o_proj"] and data["a"]["error"] is None


def test_list_reports_a_broken_adapter_and_still_lists_the_others(root, capsys):
    (root / "a" / WEIGHTS).write_bytes((root / "a" / WEIGHTS).read_bytes()[:100])
    assert main(["adapters", "list", str(root)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:5]}
    assert rows["a"][1] == "(unreadable)" and rows["b"][1] == "lora"
    assert f"a: {root / 'a' / WEIGHTS}: not a valid safetensors file" in out


# --- diff ------------------------------------------------------------------------------------
def test_diff_distances_and_cosines_equal_the_materialised_updates(root, capsys):
    result = diff_adapters(root / "a", root / "b")
    assert ("r", 4, 8) in result["config"] and ("use_rslora", False, True) in result["config"]
    assert not any(key == "peft_type" for key, _, _ in result["config"])
    rows = {row["module"]: row for row in result["modules"]}
    da, db = _delta(root / "a", Q0), _delta(root / "b", Q0)
    # the layers compute ΔW in fp32: agreement to fp32 precision
    assert math.isclose(rows[Q0]["distance"], float((da - db).norm()), rel_tol=1e-6)
    assert math.isclose(rows[Q0]["norm_b"], float(db.norm()), rel_tol=1e-6)
    cosine = float((da * db).sum() / (da.norm() * db.norm()))
    assert math.isclose(rows[Q0]["cosine"], cosine, rel_tol=1e-5, abs_tol=1e-7)
    k0 = "model.layers.0.self_attn.k_proj"  # alpha_pattern 4 with rsLoRA: s = 4 / sqrt(8)
    assert rows[k0]["note"] == "only in B" and math.isclose(rows[k0]["norm_b"], float(_delta(root / "b", k0).norm()),
                                                            rel_tol=1e-6)
    assert rows["model.layers.1.self_attn.v_proj"]["note"] == "only in A"
    distances = [row["distance"] for row in result["modules"]]
    assert distances == sorted(distances, reverse=True) and len(distances) == 6

    assert main(["adapters", "diff", str(root / "a"), str(root / "b"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "config differences:" in out and "use_rslora" in out
    assert out.count("model.layers.") == 2 and "largest distance first" in out


def test_diff_of_an_adapter_with_itself_is_zero_with_cosine_one(root):
    rows = diff_adapters(root / "runs" / "c", root / "runs" / "c")["modules"]
    assert rows and all(row["distance"] < 1e-6 * row["norm_a"] and abs(row["cosine"] - 1) < 1e-9 for row in rows)


def test_adalora_and_lora_delta_factors_match_the_layers(root):
    """The registry's delta_factors hook rebuilds each layer's ΔW from the file (scaling, rsLoRA,
    alpha_pattern, AdaLoRA's α / (r₀ + ε) and kept triplets)."""
    from lorakit.adapters import parameter_tables
    from lorakit.models.peft_format import adapter_config_from_dict, read_adapter_config_dict

    for name, method in (("b", "lora"), ("runs/c", "adalora")):
        directory = root / name
        config = adapter_config_from_dict(read_adapter_config_dict(directory), directory)
        modules, _ = module_tables(load_file(str(directory / WEIGHTS)), parameter_tables())
        for module, tables in modules.items():
            L, R = get_method(method).delta_factors(config, module, tables)
            torch.testing.assert_close(L @ R, _delta(directory, module), atol=1e-6, rtol=1e-6)


# --- check -----------------------------------------------------------------------------------
def _check(capsys, *argv) -> tuple[int, list[str]]:
    code = main(["adapters", "check", *map(str, argv)])
    return code, capsys.readouterr().out.splitlines()


def test_check_passes_sound_adapters(root, capsys):
    assert _check(capsys, root / "a") == (0, [f"{root / 'a'}: ok"])
    code, lines = _check(capsys, root)  # a folder: every adapter under it
    assert code == 0 and len(lines) == 4 and all(line.endswith(": ok") for line in lines)


def test_check_fails_on_truncated_file_nan_and_inconsistent_shapes(root, capsys):
    path = root / "a" / WEIGHTS
    intact = path.read_bytes()
    path.write_bytes(intact[:-40])
    code, lines = _check(capsys, root / "a")
    assert code == 1 and len(lines) == 1 and f"{path}: not a valid safetensors file" in lines[0]

    path.write_bytes(intact)
    tensors = load_file(str(path))
    keys = sorted(tensors)
    tensors[keys[0]][0, 0] = float("nan")
    tensors[keys[1]][1, 1] = float("inf")
    b_key = next(k for k in keys if "q_proj.lora_B" in k and "layers.1." in k)
    tensors[b_key] = torch.zeros(tensors[b_key].shape[0], 5)  # 5 columns, r = 4
    save_file(tensors, str(path), metadata={"format": "pt"})
    code, lines = _check(capsys, root / "a")
    assert code == 1 and len(lines) == 3, lines
    assert f"tensor '{keys[0]}' holds non-finite values (1 NaN" in lines[0]
    assert f"tensor '{keys[1]}' holds non-finite values (1 Inf" in lines[1]
    assert lines[2] == (f"{root / 'a'}: module 'model.layers.1.self_attn.q_proj': lora_A has 4 rows and lora_B 5 "
                        f"columns; both must be the rank r = 4")

    code, lines = _check(capsys, root)  # in a folder: only the broken adapter's lines, exit 1
    assert code == 1 and len(lines) == 6 and sum(line.endswith(": ok") for line in lines) == 3


def test_check_fails_on_missing_or_invalid_files(root, capsys):
    (root / "a" / "adapter_config.json").unlink()
    code, lines = _check(capsys, root / "a")
    assert code == 1 and lines == [f"{root / 'a'}: adapter_config.json is missing"]
    config = root / "b" / "adapter_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), r="8")))
    (root / "b" / WEIGHTS).unlink()
    code, lines = _check(capsys, root / "b")
    assert code == 1 and len(lines) == 2
    assert "r must be a positive integer, got '8'" in lines[0] and lines[1].endswith(f"{WEIGHTS} is missing")


def test_check_against_a_base_model(tmp_path, smol_tokenizer, capsys):
    from transformers import AutoModelForCausalLM

    base = save_tiny_llama(tmp_path / "base", smol_tokenizer, seed=0)
    other = save_tiny_llama(tmp_path / "other", smol_tokenizer, seed=1)
    adapter = _save(tmp_path / "adapter", LoraConfig(r=4, target_modules=["q_proj"]),
                    base=AutoModelForCausalLM.from_pretrained(base))
    assert _check(capsys, adapter, "--base", base) == (0, [f"{adapter}: ok (base {base} matches)"])
    code, lines = _check(capsys, adapter, "--base", other)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith(f"{adapter}: adapter trained on another base model ('{base}', not '{other}'): "
                               f"same shapes but other weights (relative distance ")
    assert lines[0].endswith("; it is not an adapter for this base")

    import peft  # an adapter without fingerprint: the base model name is compared, and it must load

    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))\
        .save_pretrained(tmp_path / "peft")
    assert _check(capsys, tmp_path / "peft", "--base", base) == (
        0, [f"{tmp_path / 'peft'}: ok (loads on {base}; no base fingerprint recorded, only the name compared)"])
    code, lines = _check(capsys, tmp_path / "peft", "--base", other)
    assert code == 1 and lines == [f"{tmp_path / 'peft'}: no base fingerprint (not saved by lorakit) and its base "
                                   f"model is '{base}', not '{other}'"]
