"""lorakit merge never loses data: an existing output is refused unless --overwrite, and the
adapter or a local base model is never written over, not even with --overwrite (issue 14)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from lorakit_tiny import save_tiny_llama  # noqa: E402

from lorakit import LoraConfig, LorakitError, get_peft_model  # noqa: E402
from lorakit.cli import main  # noqa: E402
from lorakit.inference.merge import merge_adapter  # noqa: E402


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory, smol_tokenizer):
    """(local base model dir, adapter dir) of a tiny Llama with a non-zero LoRA delta."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("merge-output")
    base = save_tiny_llama(root / "base", smol_tokenizer)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(root / "adapter")
    return base, root / "adapter"


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def _merge(adapter: Path, output: Path, *extra: str) -> int:
    return main(["merge", "--adapter", str(adapter), "--output", str(output), *extra])


def test_merge_refuses_an_existing_file_or_non_empty_directory_without_overwrite(base_and_adapter, tmp_path, capsys):
    _, adapter = base_and_adapter
    existing_file = tmp_path / "notes.txt"
    existing_file.write_text("keep me")
    assert _merge(adapter, existing_file) == 2
    assert "is an existing file" in _one_line_error(capsys) and existing_file.read_text() == "keep me"

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "other.txt").write_text("keep me too")
    assert _merge(adapter, folder) == 2
    err = _one_line_error(capsys)
    assert "non-empty directory" in err and "--overwrite" in err
    assert (folder / "other.txt").read_text() == "keep me too" and len(list(folder.iterdir())) == 1
    with pytest.raises(LorakitError, match="non-empty directory"):
        merge_adapter(adapter, folder)  # the library function is protected the same way


def test_merge_writes_into_an_empty_directory_and_overwrite_replaces_file_or_folder(base_and_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    _, adapter = base_and_adapter
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _merge(adapter, empty) == 0
    expected = AutoModelForCausalLM.from_pretrained(empty).state_dict()

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "other.txt").write_text("stale")
    existing_file = tmp_path / "model"
    existing_file.write_text("stale")
    for target in (folder, existing_file):
        assert _merge(adapter, target, "--overwrite") == 0
        assert target.is_dir() and not (target / "other.txt").exists()
        merged = AutoModelForCausalLM.from_pretrained(target).state_dict()
        assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "folder", "model"]  # no temporaries left


@pytest.mark.parametrize("where", ["adapter itself", "inside the adapter", "parent of the adapter",
                                   "symlink to the adapter", "base model"])
def test_merge_never_writes_over_its_inputs_even_with_overwrite(base_and_adapter, tmp_path, capsys, where):
    base, adapter = base_and_adapter
    link = tmp_path / "link"
    link.symlink_to(adapter, target_is_directory=True)
    output = {"adapter itself": adapter, "inside the adapter": adapter / "merged",
              "parent of the adapter": adapter.parent, "symlink to the adapter": link, "base model": base}[where]
    before = {d: _snapshot(d) for d in (adapter, base)}
    parent_listing = sorted(p.name for p in adapter.parent.iterdir())
    assert _merge(adapter, output, "--overwrite") == 2
    err = _one_line_error(capsys)
    assert "the input" in err and "choose another output" in err
    assert {d: _snapshot(d) for d in (adapter, base)} == before
    assert sorted(p.name for p in adapter.parent.iterdir()) == parent_listing
    with pytest.raises(LorakitError, match="the input"):
        merge_adapter(adapter, output, overwrite=True)


@pytest.mark.parametrize("base", [{"path": "x"}, ["base"], 7])
def test_merge_refuses_a_base_model_name_that_is_not_a_string_and_writes_nothing(base_and_adapter, tmp_path, capsys,
                                                                                 base):
    """Found by the adapter fuzzer: a non-string base_model_name_or_path raised TypeError from
    pathlib before the output check; now one line, and nothing appears at --output."""
    import json
    import shutil

    _, adapter = base_and_adapter
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    config = copy / "adapter_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), base_model_name_or_path=base)))
    assert _merge(copy, tmp_path / "out" / "merged") == 2
    assert "records no base_model_name_or_path" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()
