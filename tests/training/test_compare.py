"""``lorakit compare`` on a tiny model: every method, 3 steps each, one fresh process per method;
all three outputs written with a row per method, and the numbers that must hold do."""

from __future__ import annotations

import json

import pytest
import yaml
from lorakit_tiny import tiny_config_dict, tiny_llama_dir  # noqa: F401 (fixture)

from lorakit.cli import main
from lorakit.compare import DEFAULT_ENTRIES

QUESTIONS = [{"question": "What is the warranty of the Nimbus Kettle K3?", "answer": "two years"},
             {"question": "How do I descale it?", "answer": "vinegar"}]


@pytest.fixture(scope="module")
def compared(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    config = tiny_config_dict(tiny_llama_dir, tmp, tmp / "unused", max_steps=3)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp / "questions.json").write_text(json.dumps(QUESTIONS))
    code = main(["compare", str(tmp / "config.yaml"), "--output", str(tmp / "report"),
                 "--questions", str(tmp / "questions.json")])
    assert code == 0
    return tmp / "report"


def test_all_three_outputs_with_a_row_per_method(compared):
    results = json.loads((compared / "results.json").read_text())
    rows = {row["name"]: row for row in results["methods"]}
    assert list(rows) == list(DEFAULT_ENTRIES)
    assert all(row["status"] == "ok" for row in rows.values()), {n: r.get("error") for n, r in rows.items()}
    report = (compared / "report.md").read_text()
    page = (compared / "report.html").read_text()
    for name in DEFAULT_ENTRIES:
        assert f"| {name}" in report and f"<td>{name}" in page
    assert page.count("<svg") == 4 and "<script" not in page  # self-contained: inline charts, no scripts


def test_numbers_that_must_hold(compared):
    rows = {row["name"]: row for row in json.loads((compared / "results.json").read_text())["methods"]}
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"]  # full FT trains 100%
    assert rows["prompt"]["trainable_params"] == 0 and rows["prompt"]["steps"] == 0
    assert rows["lora"]["disk_bytes"] * 10 < rows["full"]["disk_bytes"]  # LoRA saves far fewer bytes
    for name, row in rows.items():
        assert row["questions"] == len(QUESTIONS) and 0 <= row["exact_match"] <= len(QUESTIONS)
        if name != "prompt":
            assert row["steps"] == 3 and len(row["loss_curve"]) == 3
            assert 0 < row["trainable_params"] <= row["total_params"]
    assert rows["qlora"]["peak_rss_bytes"] > 0 and rows["lora"]["seconds_per_step"] > 0


def test_a_failing_method_is_a_row_that_says_why(tiny_llama_dir, tmp_path):
    config = tiny_config_dict(tiny_llama_dir, tmp_path, tmp_path / "unused", max_steps=2)
    config["lora"]["target_modules"] = ["no_such_layer"]  # LoRA-shaped methods fail, full still runs
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["compare", str(tmp_path / "config.yaml"), "--methods", "lora,full", "--output",
                 str(tmp_path / "report")]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "report" / "results.json").read_text())["methods"]}
    assert rows["lora"]["status"] == "failed" and "no_such_layer" in rows["lora"]["error"]
    assert rows["full"]["status"] == "ok"
    assert "failed: " in (tmp_path / "report" / "report.md").read_text()
