"""train.compile: compiled decoder blocks give the eager per-step losses; without a C++ compiler,
and with auto on a CPU, training stays eager and says why in one line."""

from __future__ import annotations

import pytest
from lorakit_tiny import tiny_config_dict, tiny_llama_dir  # noqa: F401 (fixture)

from lorakit.config import TrainingConfig
from lorakit.errors import LorakitError
from lorakit.training import train
from lorakit.training.compile import compile_blocks, cxx_compiler, decoder_blocks
from tiny_models import tiny_model


def _losses(tiny_llama_dir, tmp_path, name, compile_setting):
    data = tiny_config_dict(tiny_llama_dir, tmp_path, tmp_path / name, max_steps=5, batch_size=2,
                            compile=compile_setting)
    data["data"].update(max_seq_len=64, packing=False, group_by_length=False)  # fixed shapes per batch
    return train(TrainingConfig.from_dict(data), progress=False).losses


@pytest.mark.slow
@pytest.mark.skipif(cxx_compiler() is None, reason="torch.compile needs a C++ compiler on CPU")
def test_compiled_blocks_give_the_eager_losses(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    # kernels compiled here, not ones a machine cached for another CPU level (a stale cache from a
    # host run without ATEN_CPU_CAPABILITY=avx2 crashes an emulated AVX2 run)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager = _losses(tiny_llama_dir, tmp_path, "eager", False)
    compiled = _losses(tiny_llama_dir, tmp_path, "compiled", True)
    assert "2 decoder blocks through torch.compile" in capsys.readouterr().out
    assert len(compiled) == 5
    assert compiled == pytest.approx(eager, abs=1e-4)


def test_without_a_compiler_training_falls_back_to_eager(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "no-such-compiler")  # the host stand-in: no C++ compiler on this machine
    model = tiny_model("llama")
    message = compile_blocks(model, True, "cpu")
    assert message.startswith("compile -> eager: no C++ compiler found")
    assert not any(type(b).__name__ == "OptimizedModule" or getattr(b, "_compiled_call_impl", None)
                   for b in decoder_blocks(model))
    eager = _losses(tiny_llama_dir, tmp_path, "eager", False)
    fallback = _losses(tiny_llama_dir, tmp_path, "fallback", True)
    assert "no C++ compiler found" in capsys.readouterr().out
    assert fallback == pytest.approx(eager, abs=1e-7)


def test_auto_stays_eager_on_cpu_and_compile_setting_is_validated():
    model = tiny_model("gpt2")
    assert len(decoder_blocks(model)) == 2
    assert compile_blocks(model, "auto", "cpu").startswith("compile auto -> eager")
    assert getattr(decoder_blocks(model)[0], "_compiled_call_impl", None) is None
    with pytest.raises(LorakitError, match="train.compile must be true, false or auto"):
        TrainingConfig.from_dict({"train": {"compile": "yes"}})
