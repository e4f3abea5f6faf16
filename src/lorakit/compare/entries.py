"""What ``lorakit compare`` trains: each entry is a registered method (or a LoRA variant) with
the settings derived from the user's config, so that every method sees the same data, steps,
seed and batch.

The LoRA-family entries take the config's own LoRA settings (rank, alpha, targets, dropout);
AdaLoRA starts at 1.5x that rank and prunes to it. Learning rates are per method where the
method's usual range differs by orders of magnitude (full fine-tuning diverges at LoRA's lr;
prefix tuning needs a larger one), as the peft and transformers examples set them; the report
prints the lr each row used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_ENTRIES = ("lora", "qlora", "dora", "adalora", "full", "prefix", "adapter", "prompt")
_LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
              "use_rslora", "modules_to_save")


@dataclass(frozen=True)
class Entry:
    """name: the report's row. method: the registry name. section: the method's config section.
    train / data: overrides of those sections (e.g. the lr)."""

    name: str
    method: str
    section: dict
    train: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)


def _lora_settings(config_dict: dict) -> dict:
    """The LoRA keys of the user's config (defaults when its method is not LoRA-shaped)."""
    section = config_dict.get("lora") or {}
    keys = {k: section[k] for k in _LORA_KEYS if section.get(k) is not None}
    keys.setdefault("r", 8)
    keys.setdefault("lora_alpha", 2 * keys["r"])
    return keys


def entries_for(config_dict: dict, names: list[str]) -> list[Entry]:
    """The entries named (unknown names are an error listing the choices)."""
    from lorakit.errors import LorakitError

    lora = _lora_settings(config_dict)
    lr = (config_dict.get("train") or {}).get("lr", 2e-4)
    max_len = (config_dict.get("data") or {}).get("max_seq_len", 1024)
    r = lora["r"]
    adalora = {k: v for k, v in lora.items() if k not in ("r", "use_rslora", "modules_to_save")}
    table = {
        "lora": Entry("lora", "lora", dict(lora)),
        "qlora": Entry("qlora", "qlora", dict(lora)),
        "dora": Entry("dora", "lora", dict(lora, use_dora=True)),
        "rslora": Entry("rslora", "lora", dict(lora, use_rslora=True)),
        "pissa": Entry("pissa", "lora", dict(lora, init_lora_weights="pissa_niter_4")),
        "adalora": Entry("adalora", "adalora", dict(adalora, init_r=max(r + 1, (3 * r) // 2), target_r=r)),
        "full": Entry("full", "full", {}, {"lr": 2e-5, "loraplus_lr_ratio": None}),
        "prefix": Entry("prefix", "prefix", {"num_virtual_tokens": 20}, {"lr": max(lr, 1e-2), "loraplus_lr_ratio": None}),
        "adapter": Entry("adapter", "adapter", {"reduction_factor": 16}, {"loraplus_lr_ratio": None}),
        # evaluation only: room for the 3 examples before each conversation costs no training
        "prompt": Entry("prompt", "prompt", {"num_examples": 3}, data={"max_seq_len": max(1024, max_len)}),
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise LorakitError(f"compare: unknown method '{unknown[0]}'; valid choices: {', '.join(table)}")
    return [table[n] for n in names]


def entry_config(config_dict: dict, entry: Entry, output_dir: str) -> dict:
    """The whole training config of one entry: the user's, with this method and settings."""
    train = dict(config_dict.get("train") or {}, **entry.train)
    train["resume"] = False
    train["save_every"] = 0
    data = dict(config_dict.get("data") or {}, **entry.data)
    return dict(config_dict, method=entry.method, lora=entry.section, data=data, train=train, output_dir=output_dir)
