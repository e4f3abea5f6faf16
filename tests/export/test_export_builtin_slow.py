"""Export and verify on the built-in model with a really trained adapter (issue 12's must-show):
the f16 GGUF gives the merged model's greedy answers on the quickstart questions, q8_0 stays
within its tolerance, the exported chat template and EOS are the tokenizer's, and verify passes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from lorakit_tiny import REPO  # noqa: E402

from lorakit.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    """The quickstart config, 30 steps (fp32): enough to change the answers to the support facts."""
    from lorakit.config import load_config
    from lorakit.training import train

    out = tmp_path_factory.mktemp("export-builtin") / "support"
    config = load_config(REPO / "examples" / "quickstart.yaml", [
        "train.max_steps=30", "train.precision=fp32", f"output_dir={out}",
        f"data.train={REPO / 'examples/data/support_train.jsonl'}", f"data.eval={REPO / 'examples/data/support_eval.jsonl'}"])
    train(config, progress=False)
    return out


@pytest.mark.slow
def test_f16_and_q8_0_exports_verify_against_the_trained_adapter(trained_adapter, tmp_path, capsys):
    f16, q8 = tmp_path / "f16" / "support.gguf", tmp_path / "q8" / "support.gguf"
    assert main(["export", "--adapter", str(trained_adapter), "--output", str(f16)]) == 0
    assert main(["export", "--adapter", str(trained_adapter), "--output", str(q8), "--quant", "q8_0"]) == 0
    modelfile = (f16.parent / "Modelfile").read_text()
    assert "FROM ./support.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    capsys.readouterr()

    assert main(["verify", "--adapter", str(trained_adapter), "--export", str(f16), "--prompts", "5"]) == 0
    out = capsys.readouterr().out
    assert "5 prompts from" in out and "support_eval.jsonl" in out
    row = next(line for line in out.splitlines() if line.startswith("gguf (f16)"))
    assert "5/5" in row and "same" in row and row.endswith("ok"), out  # identical greedy answers

    assert main(["verify", "--adapter", str(trained_adapter), "--export", str(q8), "--prompts", "3"]) == 0, \
        capsys.readouterr().out


@pytest.mark.slow
def test_adapter_gguf_of_the_trained_adapter_names_the_builtin_base(trained_adapter, tmp_path):
    from lorakit.export.run import base_gguf_file

    out = tmp_path / "adapter.gguf"
    assert main(["export", "--adapter", str(trained_adapter), "--format", "gguf-adapter", "--output", str(out)]) == 0
    modelfile = (tmp_path / "Modelfile").read_text()
    assert f"FROM {base_gguf_file('smollm2-135m-instruct')}\nADAPTER ./adapter.gguf" in modelfile
