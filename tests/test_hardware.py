"""The host probe and the precision it picks.

The probe stubs below stand in for the CPU (a host with or without native bf16); the code under
test (precision resolution, the QLoRA compute dtype, the training base dtype, the cache) is real.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from lorakit import hardware
from lorakit.hardware import HostProbe, resolve_precision
from tiny_models import tiny_model

AVX2_HOST = HostProbe(cpu="test AVX2 host", capability="AVX2", bf16_instructions=False, threads=2,
                      fp32_gflops=116.0, bf16_gflops=0.3, memory_gbps=20.0, torch_version=torch.__version__)
BF16_HOST = dataclasses.replace(AVX2_HOST, cpu="test AVX512-BF16 host", capability="AVX512", bf16_instructions=True,
                                fp32_gflops=141.0, bf16_gflops=417.0)
# native bf16 that is not faster than fp32 (e.g. a busy or oddly configured host): auto keeps fp32
BF16_NOT_FASTER = dataclasses.replace(BF16_HOST, bf16_gflops=150.0)


@pytest.fixture
def host(monkeypatch):
    """Make the probe report the given stub host: host(AVX2_HOST)."""
    def use(probe: HostProbe):
        monkeypatch.setattr(hardware, "probe_host", lambda refresh=False: probe)
    return use


def test_auto_picks_bf16_only_where_native_and_faster():
    assert resolve_precision("auto", AVX2_HOST) == "fp32"
    assert resolve_precision("auto", BF16_HOST) == "bf16"
    assert resolve_precision("auto", BF16_NOT_FASTER) == "fp32"
    assert resolve_precision("fp32", BF16_HOST) == "fp32"


def test_explicit_bf16_without_native_support_warns_with_the_measured_slowdown():
    with pytest.warns(UserWarning, match=r"without native bf16 \(AVX2\).*387x slower than fp32"):
        assert resolve_precision("bf16", AVX2_HOST) == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", BF16_HOST) == "bf16"  # native: no warning


@pytest.mark.parametrize("probe, dtype", [(AVX2_HOST, torch.float32), (BF16_HOST, torch.bfloat16)])
def test_training_base_dtype_follows_the_probe(host, probe, dtype, tmp_path, smol_tokenizer):
    from lorakit_tiny import save_tiny_llama

    from lorakit.config import TrainingConfig
    from lorakit.training.loop import load_base

    host(probe)
    save_tiny_llama(tmp_path / "model", smol_tokenizer)
    config = TrainingConfig.from_dict({"model": str(tmp_path / "model")})
    assert config.train.precision == "auto"  # the default
    model, _ = load_base(config)
    assert model.get_input_embeddings().weight.dtype == dtype


@pytest.mark.parametrize("probe, dtype", [(AVX2_HOST, torch.float32), (BF16_HOST, torch.bfloat16)])
def test_qlora_compute_dtype_auto_follows_the_probe(host, probe, dtype):
    pytest.importorskip("bitsandbytes")
    from lorakit.adapters.qlora import QLoraConfig

    host(probe)
    config = QLoraConfig(r=4, target_modules=["q_proj"])
    assert config.compute_dtype == "auto"
    model = config.prepare_base(tiny_model("llama"))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.compute_dtype == dtype


def test_probe_is_measured_once_then_read_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "_PROBE", None)
    measured = []
    monkeypatch.setattr(hardware, "measure_host", lambda: measured.append(1) or AVX2_HOST)
    assert hardware.probe_host() == AVX2_HOST
    files = list((tmp_path / "host").glob("probe-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["capability"] == "AVX2"
    monkeypatch.setattr(hardware, "_PROBE", None)  # a new process: memory empty, the file remains
    assert hardware.probe_host() == AVX2_HOST and len(measured) == 1
    files[0].write_text("{not json")  # a damaged cache is measured again, not an error
    monkeypatch.setattr(hardware, "_PROBE", None)
    assert hardware.probe_host() == AVX2_HOST and len(measured) == 2


def test_real_measurement_is_plausible():
    probe = hardware.measure_host()
    assert probe.fp32_gflops > 1 and probe.bf16_gflops > 0 and probe.memory_gbps > 0.1
    assert probe.capability == torch.backends.cpu.get_cpu_capability()
    assert probe.capability in probe.summary() and "GFLOP/s" in probe.summary()

