"""PrefixModel: a frozen causal LM whose every attention layer sees P trained key/value vectors first.

    model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=20))
    model(input_ids=ids, labels=ids).loss.backward()   # only the prefix encoder gets gradients
    model.save_pretrained("out")                        # peft's PREFIX_TUNING files

As peft's ``PeftModelForCausalLM`` does for prefix tuning: the prefix enters as a KV cache that
already holds P positions, so the model numbers the real tokens from P (RoPE and learned
positions alike), a given 2-D ``attention_mask`` gets P ones in front and given ``position_ids``
are shifted by P. The logits are for the real tokens only, so labels need no padding. A packed
batch (no mask, position_ids restarting per sample) gets a 4-D mask that keeps its samples
apart (``encoder.packed_prefix_mask``), which peft has no counterpart for. The wrapped
transformers model is ``self.model``; attribute access falls through to it.
"""

from __future__ import annotations

import dataclasses
import functools
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from lorakit._adapter_files import (CONFIG_NAME, WEIGHTS_NAME, copy_into_model, read_adapter_config_dict,
                                    read_adapter_metadata, read_adapter_weights, read_tensors, write_adapter_files,
                                    write_tensors)
from lorakit._fingerprint import base_metadata, base_record, warn_if_other_base
from lorakit.adapters.prefix.config import PrefixTuningConfig
from lorakit.adapters.prefix.encoder import PrefixEncoder, packed_prefix_mask, prefix_cache
from lorakit._modules import inner_model_getattr, parameter_counts, trainable_parameters_line
from lorakit.errors import LorakitError

FILE_KEY = "prompt_embeddings"  # peft's one tensor for prefix tuning: the flat prefix E
CHECKPOINT_STATE_NAME = "prefix_encoder.safetensors"  # the raw trained parameters (the MLP too)


class PrefixModel(nn.Module):
    """Prefix tuning (Li & Liang 2021) of ``model``; implements
    ``lorakit.adapters.contract.AdaptedModel``. The trained state is
    ``prompt_encoder[adapter_name]`` (peft's names: ``prompt_encoder.default.embedding.weight``,
    with ``prefix_projection`` also ``transform.0`` / ``transform.2``)."""

    forward_is_inner_model = False  # the prefix cache changes what the inner model computes

    def __init__(self, model: nn.Module, config: PrefixTuningConfig, adapter_name: str = "default"):
        super().__init__()
        config = config.for_model(model.config)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        self.model = model
        base_record(model)  # the base's fingerprint, recorded in the saved files
        for param in model.parameters():
            param.requires_grad_(False)
        # peft's rule: an inference-mode encoder is the flat table E, whatever prefix_projection says
        encoder = PrefixEncoder(config.num_virtual_tokens, config.token_dim, config.num_layers,
                                projected=config.prefix_projection and not config.inference_mode,
                                encoder_hidden_size=config.encoder_hidden_size,
                                zero_init=config.init_weights == "zero")
        device = next(model.parameters()).device
        self.prompt_encoder = nn.ModuleDict({adapter_name: encoder.to(device)})  # fp32, as peft keeps it
        encoder.requires_grad_(not config.inference_mode)
        self.peft_config = {adapter_name: config}
        self.active_adapter = adapter_name
        self._disabled = False

    __getattr__ = inner_model_getattr  # attributes fall through to the transformers model

    @property
    def _config(self) -> PrefixTuningConfig:
        return self.peft_config[self.active_adapter]

    @property
    def _encoder(self) -> PrefixEncoder:
        return self.prompt_encoder[self.active_adapter]

    # --- forward and generation -------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, position_ids=None, past_key_values=None,
                **kwargs):
        """The inner model's forward over the prefix cache. ``attention_mask`` / ``position_ids``
        cover the real tokens only; a non-empty cache (``cache`` or ``past_key_values``, from an
        earlier call) already holds the prefix and is continued."""
        if past_key_values is not None:
            kwargs["cache"] = past_key_values  # transformers' current name
        inputs = dict(kwargs, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if not self._disabled:
            if self.training and _checkpointing(self.model):
                raise LorakitError("prefix tuning does not work with gradient checkpointing (transformers then drops "
                                   "the cache that holds the prefix); set train.grad_checkpointing: false")
            inputs = self._with_prefix(inputs)
        return self.model(**inputs, labels=labels)

    def _with_prefix(self, inputs: dict) -> dict:
        """``inputs`` for the inner model with the prefix added: a cache holding it (when none or
        an empty one is given), the mask and positions moved by P."""
        config, count = self._config, self._config.num_virtual_tokens
        cache, packed = inputs.get("cache"), None
        if cache is None or cache.get_seq_length() == 0:
            if cache is not None and not isinstance(cache, DynamicCache):
                raise LorakitError(f"prefix tuning needs transformers' DynamicCache, got {type(cache).__name__}; "
                                   f"drop cache_implementation / the static cache")
            tokens = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
            flat = self._encoder()                                                     # (P, L * 2 * D)
            flat = flat.to(getattr(self.model, "dtype", flat.dtype))  # the base's dtype, as peft casts it
            inputs["cache"] = prefix_cache(flat, tokens.shape[0], config.num_layers, config.num_attention_heads,
                                           cache, self.model.config)
            if inputs.get("attention_mask") is None and inputs.get("position_ids") is not None:
                packed = packed_prefix_mask(self.model.config, inputs["cache"], inputs["position_ids"], flat.dtype)
                if packed is not None:  # already covers the prefix: not extended below
                    inputs["attention_mask"] = packed
        mask = inputs.get("attention_mask")
        if mask is not None and mask is not packed:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise LorakitError(f"prefix tuning takes a 2-D attention_mask (batch, tokens); got {got}")
            inputs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], count), mask], dim=1)  # (B, P + T)
        if inputs.get("position_ids") is not None:
            inputs["position_ids"] = inputs["position_ids"] + count
        return inputs

    def generate(self, *args, **kwargs):
        """The inner model's ``generate`` with the prefix: each step's inputs get it as
        ``forward`` does (the cache is filled with the prefix at the first step and then grows
        as usual; without a cache every step starts from a fresh prefix)."""
        if self._disabled:
            return self.model.generate(*args, **kwargs)
        original = self.model.prepare_inputs_for_generation

        @functools.wraps(original)  # generate checks its arguments against this signature
        def prepare_inputs_for_generation(*inner_args, **inner_kwargs):
            inputs = original(*inner_args, **inner_kwargs)
            if inputs.get("use_cache") is False:
                inputs.pop("cache", None)  # generate hands back the last step's cache even then
            return self._with_prefix(inputs)

        shadowed = vars(self.model).get("prepare_inputs_for_generation")
        # generate calls the model's own method between steps; an instance attribute is the only
        # hook transformers offers there (peft does the same), and it is undone below
        self.model.prepare_inputs_for_generation = prepare_inputs_for_generation
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            if shadowed is None:
                del self.model.prepare_inputs_for_generation
            else:
                self.model.prepare_inputs_for_generation = shadowed

    @contextmanager
    def disable_adapter(self):
        """Context in which the model computes exactly the base model (no prefix)."""
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous

    def after_optimizer_step(self, global_step: int) -> None:
        """Nothing to do after a step: the prefix has no schedule."""

    # --- no merging: the prefix is extra attention inputs, not a weight delta -----------
    def merge_adapter(self, *args, **kwargs) -> None:
        raise LorakitError("prefix tuning cannot be merged into the weights; load the adapter on the base model "
                           "instead")

    merge_and_unload = merge_adapter
    unmerge_adapter = merge_adapter

    def unload(self) -> nn.Module:
        """The base model without the prefix (it was never changed)."""
        return self.model

    # --- parameters -------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return parameter_counts(self)

    def print_trainable_parameters(self) -> str:
        return trainable_parameters_line(self)

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The encoder's live parameters: {"prompt_embeddings": E} (peft's file key) for a flat
        prefix; with the projection MLP {"prompt_encoder.embedding.weight": ..,
        "prompt_encoder.transform.0.weight": .., ...}, as the file holds only their output."""
        encoder = self._encoder
        if not encoder.projected:
            return {FILE_KEY: encoder.embedding.weight}
        return {f"prompt_encoder.{name}": param for name, param in encoder.named_parameters()}

    # --- files ------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, **_ignored) -> None:
        """peft's PREFIX_TUNING files: adapter_config.json and {"prompt_embeddings": E}, E the
        flat prefix (the MLP's output under prefix_projection, as peft saves it). A non-default
        adapter goes to a subfolder named after it, as in peft."""
        name = self.active_adapter
        self._write_adapter(Path(save_directory) if name == "default" else Path(save_directory) / name)

    def _write_adapter(self, directory: Path) -> None:
        config_dict = self._config.to_dict()
        config_dict["inference_mode"] = True
        with torch.no_grad():
            write_adapter_files(directory, config_dict, {FILE_KEY: self._encoder().float()}, base_metadata(self.model))

    def save_checkpoint_files(self, directory: Path) -> None:
        """The published files (a checkpoint is a usable adapter) plus the raw parameters, so a
        resume under prefix_projection restores the MLP exactly, not only its output."""
        self._write_adapter(Path(directory))
        write_tensors(Path(directory) / CHECKPOINT_STATE_NAME, self.trainable_tensors())

    def load_checkpoint_files(self, directory: Path) -> None:
        path = Path(directory) / CHECKPOINT_STATE_NAME
        copy_into_model(self.trainable_tensors(), read_tensors(path), str(path))


def _checkpointing(model: nn.Module) -> bool:
    """Whether any module of ``model`` recomputes activations (transformers' flag, as peft checks it)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def wrap_prefix(base: nn.Module, config: PrefixTuningConfig, adapter_name: str = "default") -> PrefixModel:
    """Freeze ``base`` and give it a trainable prefix (the registry's ``wrap``)."""
    return PrefixModel(base, config, adapter_name)


def load_prefix(base: nn.Module, directory: str | Path, adapter_name: str = "default",
                is_trainable: bool = False) -> PrefixModel:
    """``base`` with the prefix saved in ``directory`` by lorakit or peft (the registry's ``load``)."""
    directory = Path(directory)
    config = PrefixTuningConfig.from_dict(read_adapter_config_dict(directory), where=str(directory / CONFIG_NAME))
    if is_trainable and config.prefix_projection:
        raise LorakitError(f"{directory}: a prefix_projection adapter's files hold the projected prefix, not the MLP "
                           f"that made it, so it cannot be trained further (peft cannot either); "
                           f"resume from a training checkpoint instead")
    config = config.for_model(base.config)  # an adapter made for another model: refused before reading tensors
    weights = read_adapter_weights(directory)
    warn_if_other_base(read_adapter_metadata(directory), base, str(directory))
    model = PrefixModel(base, dataclasses.replace(config, inference_mode=not is_trainable), adapter_name)
    copy_into_model(model.trainable_tensors(), weights, str(directory / WEIGHTS_NAME))
    return model
