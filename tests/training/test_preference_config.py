"""Preference settings in the training config: TRL's names, one-line errors for bad values, and
an objective that does not fit the rows (or packing) refused before any model is loaded."""

from __future__ import annotations

import json

import pytest
from lorakit_tiny import tiny_llama_dir  # noqa: F401 (fixture)

from lorakit.config import TrainingConfig, load_config
from lorakit.errors import LorakitError
from lorakit.training import train


def test_trl_names_load_and_are_checked():
    config = load_config(None, ["train.objective=simpo", "train.beta=2.0", "train.simpo_gamma=0.5",
                                "train.cpo_alpha=0", "train.label_smoothing=0.1",
                                "train.precompute_ref_log_probs=true"])
    args = config.train
    assert (args.objective, args.beta, args.simpo_gamma, args.label_smoothing) == ("simpo", 2.0, 0.5, 0.1)
    assert args.precompute_ref_log_probs is True and TrainingConfig().train.objective == "sft"
    with pytest.raises(LorakitError, match=r"train.objective 'dop' is unknown.*dpo"):
        load_config(None, ["train.objective=dop"])
    for override, message in (("train.beta=0", "train.beta must be a finite number > 0"),
                              ("train.label_smoothing=0.5", "train.label_smoothing must be"),
                              ("train.desirable_weight=-1", "train.desirable_weight must be"),
                              ("train.precompute_ref_log_probs=yes please", "must be true or false")):
        with pytest.raises(LorakitError, match=message) as err:
            load_config(None, [override])
        assert "\n" not in str(err.value)


def _config(model_dir, tmp_path, rows, **train_args):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return TrainingConfig.from_dict({"model": str(model_dir), "lora": {"r": 2, "target_modules": ["q_proj"]},
                                     "data": {"train": str(path), **train_args.pop("data", {})},
                                     "train": {"max_steps": 1, "precision": "fp32", **train_args},
                                     "output_dir": str(tmp_path / "out")})


PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}
CHAT = {"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("rows,objective,message", [
    ([PAIR], "sft", "train.objective sft trains on conversations .* has preference rows"),
    ([CHAT], "dpo", r"train.objective dpo trains on \{prompt, chosen, rejected\} rows, but .* has chat rows"),
    ([PAIR], "kto", r"train.objective kto trains on \{prompt, completion, label\} rows"),
])
def test_objective_must_fit_the_rows(tiny_llama_dir, tmp_path, rows, objective, message):
    with pytest.raises(LorakitError, match=message):
        train(_config(tiny_llama_dir, tmp_path, rows, objective=objective), progress=False)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_packing_true_is_refused_for_preference_rows(tiny_llama_dir, tmp_path):
    with pytest.raises(LorakitError, match="data.packing is not supported with train.objective dpo"):
        train(_config(tiny_llama_dir, tmp_path, [PAIR], objective="dpo", data={"packing": True}), progress=False)


def test_checkpoint_from_before_objectives_existed_still_resumes(tiny_llama_dir, tmp_path):
    """A checkpoint written before train.objective & co. existed records no such keys: it resumes as sft."""
    from lorakit.training.checkpoint import latest_checkpoint

    rows = [CHAT] * 4
    train(_config(tiny_llama_dir, tmp_path, rows, save_every=1, batch_size=2), progress=False)
    state_path = latest_checkpoint(tmp_path / "out") / "trainer_state.json"
    state = json.loads(state_path.read_text())
    for key in ("objective", "beta", "label_smoothing", "simpo_gamma", "cpo_alpha", "desirable_weight",
                "undesirable_weight", "precompute_ref_log_probs"):
        del state["config"]["train"][key]
    state_path.write_text(json.dumps(state))
    resumed = train(_config(tiny_llama_dir, tmp_path, rows, save_every=1, batch_size=2, max_steps=2, resume=True),
                    progress=False)
    assert sorted(resumed.losses) == [2]
    with pytest.raises(LorakitError, match="'train.objective' was 'sft' there and is 'dpo' now"):
        train(_config(tiny_llama_dir, tmp_path, [PAIR] * 4, objective="dpo", max_steps=3, batch_size=2,
                             resume=True), progress=False)


def test_lorakit_eval_on_kto_rows_reports_the_runs_final_figures(tiny_llama_dir, tmp_path, capsys):
    from lorakit.cli import main

    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i + i % 2}.", "label": i % 2 == 0}
            for i in range(6)]
    config = _config(tiny_llama_dir, tmp_path, rows, objective="kto", max_steps=3, batch_size=3, lr=2e-2)
    config.data.eval = config.data.train
    result = train(config, progress=False)
    capsys.readouterr()
    assert main(["eval", "--adapter", str(tmp_path / "out"), "--data", config.data.eval]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "preference accuracy" in printed[0] and "answers" in printed[0]
    reported = json.loads(printed[-1])
    for key in ("loss", "kl", "rewards/margins", "rewards/accuracies"):
        assert reported[key] == pytest.approx(result.eval_metrics[key], abs=1e-5), key
    assert reported["kl"] > 0  # three steps moved the policy away from the reference
