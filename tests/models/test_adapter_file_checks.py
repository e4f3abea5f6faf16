"""Every reader of an adapter accepts and refuses the same files (issue 14): an adapter with a
NaN or Inf tensor is refused, naming the tensor, by info, generate, eval, merge and the server's
load endpoint; a config value of the wrong type ("r": "16") is refused by info as by the loaders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from lorakit_tiny import save_tiny_llama, write_chat_subset  # noqa: E402

from lorakit import LoraConfig, LorakitError, get_peft_model, load_adapter  # noqa: E402
from lorakit.cli import main  # noqa: E402

BAD_TENSOR = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, smol_tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("checks-base"), smol_tokenizer)


@pytest.fixture
def adapter(tiny_base, tmp_path):
    """A fresh LoRA adapter over ``tiny_base`` (q_proj, v_proj) in tmp_path/adapters/a."""
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    directory = tmp_path / "adapters" / "a"
    model.save_pretrained(directory)
    return directory


def _poison(directory: Path, value: float) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors[BAD_TENSOR][1, 2] = value
    save_file(tensors, str(path), metadata={"format": "pt"})


def _error_line(capsys) -> str:
    """The last stderr line, which must be lorakit's one-line error (progress bars may precede it)."""
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    return last


@pytest.mark.parametrize("value, kind", [(float("nan"), "1 NaN"), (float("inf"), "1 Inf")])
def test_non_finite_adapter_tensor_is_refused_by_every_command(adapter, tmp_path, capsys, value, kind):
    _poison(adapter, value)
    eval_file = write_chat_subset(tmp_path / "eval.jsonl", rows=4)
    commands = {
        "info": ["info", str(adapter)],
        "generate": ["generate", "--adapter", str(adapter), "--max-new-tokens", "2", "hi"],
        "eval": ["eval", "--adapter", str(adapter), "--data", str(eval_file), "--max-seq-len", "64"],
        "merge": ["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = _error_line(capsys)
        assert f"tensor '{BAD_TENSOR}' holds non-finite values ({kind}" in err, (name, err)
    assert not (tmp_path / "merged").exists()
    with pytest.raises(LorakitError, match="non-finite"):
        load_adapter(torch.nn.Module(), adapter)  # the library refuses before touching the model


def test_non_finite_adapter_is_refused_by_the_server_load_endpoint(adapter, tiny_base):
    from starlette.testclient import TestClient

    from lorakit.server.run import build_app

    _poison(adapter, float("nan"))
    app, engine = build_app(str(tiny_base), adapter_root=adapter.parent, served_model_name="base")
    try:
        client = TestClient(app)
        response = client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "a"})
        assert response.status_code == 400
        assert BAD_TENSOR in response.json()["error"]["message"]
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base"]
    finally:
        engine.close()


def test_info_refuses_a_config_value_of_the_wrong_type_like_the_loaders(adapter, tiny_base, capsys):
    from transformers import AutoModelForCausalLM

    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), r="16")))
    with pytest.raises(LorakitError) as excinfo:
        load_adapter(AutoModelForCausalLM.from_pretrained(tiny_base), adapter)
    assert "r must be a positive integer, got '16'" in str(excinfo.value)
    capsys.readouterr()
    assert main(["info", str(adapter)]) == 2
    assert _error_line(capsys) == f"error: {excinfo.value}"  # the same check, the same line
