"""lorakit train refuses an output_dir it cannot create, with one line and before the base model
loads (issue 14: an output_dir naming an existing file gave a NotADirectoryError traceback)."""

from __future__ import annotations

import pytest
import yaml

from lorakit.cli import main


def _config(tmp_path, output_dir) -> str:
    """A config whose model and data do not exist: the run must stop at output_dir before them."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": str(tmp_path / "no-such-model"), "output_dir": str(output_dir),
                                    "data": {"train": str(tmp_path / "no-such-data.jsonl")}}))
    return str(path)


@pytest.mark.parametrize("where", ["output_dir is a file", "output_dir is inside a file"])
def test_train_refuses_an_output_dir_that_is_a_file_before_loading(tmp_path, capsys, where):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    output_dir = existing if where == "output_dir is a file" else existing / "run"
    assert main(["train", _config(tmp_path, output_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output_dir '{output_dir}'") and err.count("\n") == 1
    assert "not a directory" in err and "choose another output_dir" in err
    assert existing.read_text() == "keep me"


def test_train_output_dir_override_is_checked_too(tmp_path, capsys):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    assert main(["train", _config(tmp_path, tmp_path / "fine"), f"output_dir={existing}"]) == 2
    assert "is an existing file" in capsys.readouterr().err
