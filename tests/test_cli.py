"""The lorakit command end to end on a tiny random Llama with the real SmolLM2 tokenizer:
train -> info -> generate -> eval -> merge (the merged directory loads in transformers with the
adapted model's logits), chat keeps its history, errors are one line with exit status 2."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent / "training"))
from lorakit_tiny import tiny_config_dict, tiny_llama_dir  # noqa: E402,F401 (fixture)

from lorakit.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    """One `lorakit train` run shared by the tests below: (config path, output dir, eval file)."""
    root = tmp_path_factory.mktemp("cli")
    data = tiny_config_dict(tiny_llama_dir, root, root / "adapter", max_steps=4)
    config_path = root / "run.yaml"
    config_path.write_text(yaml.safe_dump(data))
    assert main(["train", str(config_path), "train.lr=2e-2", "lora.r=8", "--no-progress"]) == 0
    return config_path, root / "adapter", Path(data["data"]["eval"])


def test_train_writes_adapter_card_metrics_and_plot(trained):
    _, out, _ = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "metrics.jsonl", "loss.png",
                 "training_config.yaml"):
        assert (out / name).is_file(), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"  # the override applied
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]  # before and after training
    card = (out / "README.md").read_text()
    assert "base model" in card and "final eval loss" in card and "lr: 0.02" in card


def test_info(trained, capsys):
    _, out, _ = trained
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "lora" and info["ranks"] == [8]
    assert info["targets"] == ["q_proj", "up_proj", "v_proj"] and info["adapted_modules"] == 6
    # tiny Llama: hidden 32, kv dim 16, intermediate 64; r=8 -> A (8, in) + B (out, 8) per module
    per_layer = 8 * (32 + 32) + 8 * (32 + 16) + 8 * (32 + 64)
    assert info["trainable_params"] == 2 * per_layer
    assert info["base_model"] == json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert main(["info", str(out)]) == 0
    assert "trainable params:  3,328" in capsys.readouterr().out


def test_generate_streams_the_adapted_models_greedy_reply(trained, capsys):
    from lorakit.inference.generate import GenerationSettings, generate, load_for_inference

    _, out, _ = trained
    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "8", "What is the PIN?"]) == 0
    printed = capsys.readouterr().out.strip()
    model, tokenizer = load_for_inference(adapter=out)  # model from base_model_name_or_path
    expected = generate(model, tokenizer, "What is the PIN?", GenerationSettings(max_new_tokens=8))
    assert printed == expected and printed
    assert main(["generate", "--model", model.name_or_path, "--max-new-tokens", "8", "--temperature", "0.8",
                 "--seed", "1", "What is the PIN?"]) == 0  # bare base, sampling


def test_chat_keeps_history(trained, monkeypatch, capsys):
    import lorakit.inference.generate as gen

    _, out, _ = trained
    seen = []
    real = gen.generate

    def spy(model, tokenizer, prompt, *args, **kwargs):
        seen.append([dict(m) for m in prompt])
        return real(model, tokenizer, prompt, *args, **kwargs)

    monkeypatch.setattr(gen, "generate", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nand the PIN?\n/reset\nagain\n"))
    assert main(["chat", "--adapter", str(out), "--max-new-tokens", "4", "--system", "be brief"]) == 0
    assert [[m["role"] for m in turn] for turn in seen] == [
        ["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    assert seen[1][1]["content"] == "hello" and seen[1][3]["content"] == "and the PIN?"
    assert capsys.readouterr().out.count("assistant> ") == 3


def test_eval_reports_response_token_loss_for_adapter_and_base(trained, capsys):
    _, out, eval_file = trained
    assert main(["eval", "--adapter", str(out), "--data", str(eval_file), "--max-seq-len", "128",
                 "--batch-size", "3"]) == 0
    adapted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r for r in rows if "eval_loss" in r][-1]
    assert adapted["loss"] == pytest.approx(final_eval["eval_loss"], abs=1e-4)  # same tokens, other batching
    assert adapted["ppl"] == pytest.approx(torch.tensor(adapted["loss"]).exp().item(), rel=1e-5)
    base_model = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert main(["eval", "--model", base_model, "--data", str(eval_file), "--max-seq-len", "128"]) == 0
    base = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert base["tokens"] == adapted["tokens"] and base["loss"] > adapted["loss"]


def test_merge_gives_a_transformers_dir_with_the_adapted_logits(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.inference.generate import load_for_inference

    _, out, _ = trained
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out), "--output", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    adapted, _ = load_for_inference(adapter=out)
    ids = tokenizer("The Nimbus Kettle K3 costs", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert main(["merge", "--adapter", str(out), "--output", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert next(AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").parameters()).dtype == torch.bfloat16


def test_errors_are_one_line_with_exit_status_2(trained, tmp_path, capsys):
    config_path, _, _ = trained
    assert main(["train", str(config_path), "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key 'lrr'") and "did you mean 'lr'" in err and err.count("\n") == 1
    assert main(["info", str(tmp_path)]) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(tmp_path / "nope"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_is_fast_because_nothing_heavy_is_imported():
    code = "import sys, lorakit.cli as c; c.build_parser(); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    help_text = subprocess.run([sys.executable, "-m", "lorakit.cli", "--help"], capture_output=True, text=True).stdout
    for command in ("train", "generate", "chat", "eval", "merge", "info"):
        assert command in help_text


def test_env_prints_the_measured_host(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert main(["env", "--refresh", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["fp32_gflops"] > 0 and info["bf16_gflops"] > 0 and info["memory_gbps"] > 0
    assert info["precision_auto"] == ("bf16" if info["bf16_native"] and info["bf16_gflops"] >= 1.3 * info["fp32_gflops"]
                                      else "fp32")
    assert info["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert main(["env"]) == 0  # text form, read back from the cache the first call wrote
    assert "matmul fp32:" in capsys.readouterr().out and list((tmp_path / "host").glob("probe-*.json"))


def test_overrides_may_follow_an_option(tiny_llama_dir, tmp_path, capsys):
    """argparse fills nargs='*' once: `train run.yaml --no-progress k=v` used to fail with
    'unrecognized arguments'; the overrides now apply wherever they stand."""
    config = tiny_config_dict(tiny_llama_dir, tmp_path, tmp_path / "out", max_steps=1)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "run.yaml"), "--no-progress", "train.max_steps=2", "train.lr=1e-3"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert max(row["step"] for row in rows) == 2  # the override after the option took effect
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path / "run.yaml"), "--no-progress", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_generate_refuses_text_that_is_not_utf8_in_one_line(capsys):
    """Latin-1 bytes on the command line reach Python as lone surrogates: one line, no traceback,
    before any model is loaded (the adapter path does not even exist)."""
    assert main(["generate", "--adapter", "no-such-dir", "caf\udce9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the prompt is not valid UTF-8 text") and err.count("\n") == 1


def test_generate_refuses_a_prompt_longer_than_the_context(tiny_llama_dir, capsys):
    """Issue 14: such a prompt ran for minutes and printed nothing; now one line, exit 2."""
    assert main(["generate", "--model", str(tiny_llama_dir), "--raw", "word " * 600]) == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert error_lines == ["error: the prompt has 601 tokens and the model's context holds 512; shorten the prompt"]
