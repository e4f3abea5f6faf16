"""PrefixTuningConfig: peft's names and defaults for prefix tuning of a causal LM.

The shape fields (``num_layers``, ``token_dim``, ``num_attention_heads``,
``num_transformer_submodules``, ``encoder_hidden_size``) are left None by the user and filled
from the model's config when the model is adapted (``for_model``), with peft's rules, so the
saved adapter_config.json is the one peft writes. Differences from peft (deliberate):
``task_type`` defaults to and must be "CAUSAL_LM" (lorakit adapts causal LMs only, which have
one transformer stack: ``num_transformer_submodules`` 1), values the model cannot take (a
``token_dim`` that is not the model's key/value width) fail when adapting with one line
instead of deep inside attention, and ``modules_to_save`` is accepted only empty.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lorakit._dataclass_config import peft_config_dict, peft_config_kwargs, strict_config
from lorakit.errors import LorakitError

INIT_CHOICES = (None, "zero")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@strict_config
@dataclass
class PrefixTuningConfig:
    """Prefix tuning (Li & Liang 2021), named as in ``peft.PrefixTuningConfig``.

    P = num_virtual_tokens trained key/value vectors per layer are put before every sequence:
    layer l attends over [K_l^prefix; K_l x] and [V_l^prefix; V_l x], each prefix part of shape
    (kv_heads, P, head_dim). The trained table is E of shape (P, num_layers * 2 * token_dim),
    token_dim = kv_heads * head_dim. prefix_projection: E is instead computed by the MLP
    Linear(token_dim, encoder_hidden_size) -> tanh -> Linear(., num_layers * 2 * token_dim) from
    a (P, token_dim) table, a reparametrisation the paper uses for stable training; the saved
    file holds the MLP's output either way. init_weights "zero": E (or the MLP's last layer) starts
    at zero.
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    peft_type = "PREFIX_TUNING"  # class attribute, not a field: fixed for this config type

    def __post_init__(self):
        if not _positive_int(self.num_virtual_tokens):
            raise LorakitError(f"PrefixTuningConfig.num_virtual_tokens must be a positive integer, "
                               f"got {self.num_virtual_tokens!r}")
        for name in ("encoder_hidden_size", "token_dim", "num_layers", "num_attention_heads"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise LorakitError(f"PrefixTuningConfig.{name} must be a positive integer or null, got {value!r}")
        if not isinstance(self.prefix_projection, bool):
            raise LorakitError(f"PrefixTuningConfig.prefix_projection must be true or false, "
                               f"got {self.prefix_projection!r}")
        if self.init_weights not in INIT_CHOICES:
            raise LorakitError(f"PrefixTuningConfig.init_weights must be null or 'zero', got {self.init_weights!r}")
        if self.num_transformer_submodules not in (None, 1):
            raise LorakitError(f"PrefixTuningConfig.num_transformer_submodules must be 1 for a causal LM "
                               f"(2 is for encoder-decoder models), got {self.num_transformer_submodules!r}")
        if self.task_type not in (None, "CAUSAL_LM"):
            raise LorakitError(f"PrefixTuningConfig.task_type must be 'CAUSAL_LM' (lorakit adapts causal language "
                               f"models), got {self.task_type!r}")
        if self.modules_to_save:
            raise LorakitError("PrefixTuningConfig.modules_to_save is not supported by lorakit's prefix tuning; "
                               "remove it (or train those modules with method: lora)")
        if self.token_dim is not None and self.num_attention_heads is not None \
                and self.token_dim % self.num_attention_heads:
            raise LorakitError(f"PrefixTuningConfig.token_dim ({self.token_dim}) must be a multiple of "
                               f"num_attention_heads ({self.num_attention_heads})")

    @property
    def head_dim(self) -> int:
        return self.token_dim // self.num_attention_heads

    def for_model(self, model_config) -> "PrefixTuningConfig":
        """A copy with the shape fields filled from a transformers config, as peft does
        (``_prepare_prompt_learning_config``): num_layers = the decoder's layer count; with
        grouped-query attention the prefix has the key/value heads' shape, so token_dim =
        num_key_value_heads * head_dim and num_attention_heads = num_key_value_heads; otherwise
        token_dim = hidden size. A value already set must equal the model's (a saved adapter
        made for another model is refused here, before any tensor is read)."""
        layers, heads, head_dim = kv_geometry(model_config)
        wanted = {"num_layers": layers, "token_dim": heads * head_dim, "num_attention_heads": heads,
                  "num_transformer_submodules": 1}
        for name, value in wanted.items():
            given = getattr(self, name)
            if given is not None and given != value:
                raise LorakitError(f"PrefixTuningConfig.{name} is {given} but the model needs {value} "
                                   f"({layers} layers of {heads} key/value heads x {head_dim}); leave it unset "
                                   f"to take it from the model (an adapter made for another model?)")
        filled = dataclasses.replace(self, **wanted)
        if filled.encoder_hidden_size is None:
            filled.encoder_hidden_size = filled.token_dim
        return filled

    # --- serialisation in peft's adapter_config.json layout -----------------------------
    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content: every field plus ``peft_type``."""
        return peft_config_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "PrefixTuningConfig") -> "PrefixTuningConfig":
        """Build from a dict (YAML, or a peft adapter_config.json); see ``peft_config_kwargs``."""
        return cls(**peft_config_kwargs(cls, data, where))


def kv_geometry(model_config) -> tuple[int, int, int]:
    """(layers, key/value heads, head_dim) of a transformers decoder config, with peft's key
    names (``num_hidden_layers`` | ``num_layers`` | ``n_layer``, ``hidden_size`` | ``n_embd`` |
    ``d_model``, ``num_attention_heads`` | ``n_head`` | ``num_heads``, then ``num_key_value_heads``
    and ``head_dim`` when the config has them)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    data = text.to_dict()  # a multimodal model: its language model's config
    # the attribute first: transformers maps n_layer / num_layers onto it
    layers = getattr(text, "num_hidden_layers", None) or _first(data, ("num_layers", "n_layer"), "num_layers")
    hidden = _first(data, ("hidden_size", "n_embd", "d_model"), "token_dim")
    heads = _first(data, ("num_attention_heads", "n_head", "num_heads"), "num_attention_heads")
    if data.get("num_key_value_heads") is None:
        return layers, heads, hidden // heads
    head_dim = data.get("head_dim") or hidden // heads
    return layers, data["num_key_value_heads"], head_dim


def _first(data: dict, keys: tuple[str, ...], field_name: str) -> int:
    for key in keys:
        if data.get(key) is not None:
            return data[key]
    raise LorakitError(f"prefix tuning needs the model's {field_name}, but its config has none of "
                       f"{', '.join(keys)} (not a transformers causal LM?)")
