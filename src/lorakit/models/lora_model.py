"""LoraModel: a transformers causal LM with adapters injected, and peft's user-facing API.

    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    model.save_pretrained("out")            # peft layout
    merged = model.merge_and_unload()       # plain transformers model

The wrapped model is ``self.model``; attribute access falls through to it (``config``,
``generate``, ``device`` ...). Several named adapters can live side by side; one set is
active at a time (mixed per-row batches live in ``lorakit.inference``).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lorakit import _fingerprint
from lorakit._modules import inner_model_getattr, parameter_counts, set_submodule, trainable_parameters_line
from lorakit.adapters import method_for_config
from lorakit.adapters.registry import all_layer_types
from lorakit.errors import LorakitError
from lorakit.models import peft_format
from lorakit.models.modules_to_save import ModulesToSaveWrapper
from lorakit.models.targets import find_target_modules


HOOKS_STATE = "method_state.pt"  # a checkpoint's training-hook state (torch.save, read with weights_only)


class LoraModel(nn.Module):
    """A causal LM whose selected layers carry adapters of a layer method (LoRA, QLoRA, AdaLoRA,
    any registered method with ``attach``); see module docstring. Implements
    ``lorakit.adapters.contract.AdaptedModel``; the method's declared hooks (registry) are the
    only method-specific code paths."""

    def __init__(self, model: nn.Module, config, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, object] = {}
        self.active_adapter = adapter_name
        self._training_hooks: dict[str, object] = {}
        for param in model.parameters():
            param.requires_grad_(False)
        self.add_adapter(adapter_name, config)

    # --- attribute fall-through and forward ---------------------------------------------
    __getattr__ = inner_model_getattr  # attributes fall through to the transformers model

    def forward(self, *args, **kwargs):
        outputs = self.model(*args, **kwargs)
        hooks = self._training_hooks.get(self.active_adapter)
        loss = getattr(outputs, "loss", None)
        if hooks is not None and self.training and isinstance(loss, torch.Tensor):
            # a method's training regulariser (AdaLoRA: orthogonality); eval losses stay pure
            # language-model losses (peft adds it in eval mode too)
            outputs.loss = loss + hooks.extra_loss()
        return outputs

    def update_and_allocate(self, global_step: int) -> None:
        """Per-step training hook with peft's name: AdaLoRA reallocates rank here; a no-op for
        methods without one. Call after optimizer.step() and before zero_grad()."""
        hooks = self._training_hooks.get(self.active_adapter)
        if hooks is not None:
            hooks.update_and_allocate(global_step)

    after_optimizer_step = update_and_allocate  # the AdaptedModel contract's name

    @property
    def forward_is_inner_model(self) -> bool:
        """True unless the active adapter's method adds a training regulariser in forward."""
        return self._training_hooks.get(self.active_adapter) is None

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    @property
    def base_model(self) -> "LoraModel":
        """peft compatibility: ``peft_model.base_model.model`` is the transformers model."""
        return self

    def adapter_layers(self):
        """(name, module) for every adapter wrapper layer in the model."""
        types = all_layer_types()
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, types)]

    def _wrappers(self):
        return [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)]

    # --- adapters ---------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config) -> None:
        """Inject a new adapter into the layers ``config`` selects; it becomes trainable."""
        if adapter_name in self.peft_config:
            raise LorakitError(f"adapter '{adapter_name}' already exists; choose another name or delete it first")
        method = method_for_config(config)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(self.model, "name_or_path", None) or None
        _fingerprint.base_record(self.model)  # the base as loaded, before QLoRA / PiSSA change it
        if method.prepare_base is not None:  # QLoRA quantizes the whole base first
            method.prepare_base(self.model, config)
        targets = find_target_modules(self.model, config)
        if config.target_modules == "all-linear" and getattr(config, "layers_to_transform", None) is not None:
            # peft rejects a string target with layers_to_transform in a saved config; record the names
            config.target_modules = sorted({name.split(".")[-1] for name in targets})
        for name in targets:
            module = self.model.get_submodule(name)
            replacement = method.attach(module, adapter_name, config, name)
            if replacement is not module:
                set_submodule(self.model, name, replacement)
        for name in config.modules_to_save or []:
            self._add_module_to_save(name, adapter_name)
        self.peft_config[adapter_name] = config
        if method.training_hooks is not None and not config.inference_mode:  # AdaLoRA's rank allocator
            self._training_hooks[adapter_name] = method.training_hooks(self.adapter_layers(), adapter_name, config)
        if config.bias != "none":
            for param in peft_format.adapter_tensors(self.model, adapter_name, config.bias, all_layer_types()).values():
                param.requires_grad_(True)
        self.set_adapter(adapter_name)

    def _add_module_to_save(self, suffix: str, adapter_name: str) -> None:
        matches = [n for n, m in self.model.named_modules()
                   if (n == suffix or n.endswith("." + suffix)) and ".modules_to_save." not in n
                   and not n.endswith(".original_module")]
        if not matches:
            raise LorakitError(f"modules_to_save entry '{suffix}' matches no module of {type(self.model).__name__}")
        for name in matches:
            module = self.model.get_submodule(name)
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module)
                set_submodule(self.model, name, module)
            module.add_adapter(adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the only active adapter (and the only trainable one)."""
        if adapter_name not in self.peft_config:
            raise LorakitError(f"unknown adapter '{adapter_name}'; loaded: {', '.join(self.peft_config)}")
        for _, layer in self.adapter_layers():
            layer.active_adapters = [adapter_name] if layer.has_adapter(adapter_name) else []
        for wrapper in self._wrappers():
            wrapper.active_adapter = adapter_name if adapter_name in wrapper.modules_to_save else None
        trainable = not getattr(self.peft_config[adapter_name], "inference_mode", False)
        for name, param in self.model.named_parameters():
            owners = [a for a in self.peft_config if peft_format.file_key(name, a) is not None]
            if owners:
                param.requires_grad_(trainable and adapter_name in owners)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise LorakitError(f"unknown adapter '{adapter_name}'; loaded: {', '.join(self.peft_config)}")
        for _, layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        for wrapper in self._wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        self._training_hooks.pop(adapter_name, None)
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    @contextmanager
    def disable_adapter(self):
        """Context in which the model computes exactly the base model's outputs."""
        modules = [m for _, m in self.adapter_layers()] + self._wrappers()
        for module in modules:
            module.disable_adapters = True
        try:
            yield
        finally:
            for module in modules:
                module.disable_adapters = False

    # --- merging ----------------------------------------------------------------------
    def merge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.merge()

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def _unwrap(self, merge: bool) -> nn.Module:
        for name, layer in self.adapter_layers():
            if merge:
                layer.merge()
            set_submodule(self.model, name, layer.base_layer)
        for name, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                set_submodule(self.model, name, module.current_module() if merge else module.original_module)
        for param in self.model.parameters():
            param.requires_grad_(False)
        if merge:
            _fingerprint.forget_record(self.model)  # other weights now: an adapter trained on it records them
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Fold the active adapter into the base weights and return the plain transformers model."""
        if adapter_names:
            self.set_adapter(adapter_names[0])
        return self._unwrap(merge=True)

    def unload(self) -> nn.Module:
        """Remove all adapters without merging; returns the original transformers model. It keeps
        its base fingerprint (the weights as loaded), also where PiSSA left the residual weights
        in it: an adapter trained on that residual base records the original one."""
        self.unmerge_adapter()
        return self._unwrap(merge=False)

    # --- parameters -------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return parameter_counts(self.model)

    def print_trainable_parameters(self) -> str:
        return trainable_parameters_line(self.model)

    # --- files ------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The live parameters of one adapter under peft's file names."""
        name = adapter_name or self.active_adapter
        config = self.peft_config[name]
        return peft_format.adapter_tensors(self.model, name, config.bias, all_layer_types())

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The active adapter's parameters under peft's file names (what checkpoints hold)."""
        return self.adapter_state_dict()

    def save_pretrained(self, save_directory: str | Path, selected_adapters: list[str] | None = None,
                        convert_pissa_to_lora: bool = True, **_ignored) -> None:
        """peft layout: the "default" adapter in ``save_directory``, others in subfolders.
        What the files hold is the method's ``file_contents`` hook (a PiSSA adapter is saved as
        the equivalent plain LoRA adapter for the original base unless
        ``convert_pissa_to_lora=False``; AdaLoRA drops pruned triplets). The file's metadata
        records the base model (``lorakit.models.fingerprint``)."""
        metadata = _fingerprint.base_metadata(self.model)
        for name in selected_adapters or list(self.peft_config):
            directory = Path(save_directory) if name == "default" else Path(save_directory) / name
            config = self.peft_config[name]
            method = method_for_config(config)
            if name == self.active_adapter:
                self._check_all_trainable_saved(name)
            if method.file_contents is not None:
                config_dict, tensors = method.file_contents(self, name, config, convert_pissa_to_lora)
            else:
                config_dict, tensors = config.to_dict(), self.adapter_state_dict(name)
            config_dict["inference_mode"] = True
            peft_format.write_adapter_files(directory, config_dict, tensors, metadata)

    def _check_all_trainable_saved(self, adapter_name: str) -> None:
        """A trainable parameter must have a file key (a table its method declares); one that
        does not would silently be missing from the saved adapter."""
        saved = {id(p) for p in self.adapter_state_dict(adapter_name).values()}
        for name, param in self.model.named_parameters():
            if param.requires_grad and id(param) not in saved:
                raise LorakitError(f"trainable parameter '{name}' would not be saved: it is in no adapter table "
                                   f"its method declares (registry parameter_tables); freeze it or declare its table")

    def save_checkpoint_files(self, directory: Path) -> None:
        """The adapters as they are in memory (PiSSA's raw factors, AdaLoRA at init_r), plus the
        training hooks' state (AdaLoRA's importance averages and masks), for an exact resume."""
        self.save_pretrained(directory, convert_pissa_to_lora=False)
        hooks = self._training_hooks.get(self.active_adapter)
        if hooks is not None:
            torch.save(hooks.state_dict(), Path(directory) / HOOKS_STATE)

    def load_checkpoint_files(self, directory: Path) -> None:
        peft_format.copy_into_model(self.adapter_state_dict(), peft_format.read_adapter_weights(directory),
                                    str(directory))
        hooks = self._training_hooks.get(self.active_adapter)
        if hooks is not None:
            path = Path(directory) / HOOKS_STATE
            if not path.is_file():
                raise LorakitError(f"checkpoint '{directory}' has no {HOOKS_STATE} (the method's training state); "
                                   f"it is incomplete or from an older lorakit")
            hooks.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def load_adapter(self, directory: str | Path, adapter_name: str = "default",
                     is_trainable: bool = False) -> None:
        """Add the adapter saved in ``directory`` under ``adapter_name`` and activate it. An
        adapter whose file records another base model is loaded with a BaseMismatchWarning
        saying what differs (``lorakit.models.fingerprint``)."""
        config = peft_format.adapter_config_from_dict(peft_format.read_adapter_config_dict(directory), directory)
        config.inference_mode = not is_trainable
        weights = peft_format.read_adapter_weights(directory)
        _fingerprint.warn_if_other_base(peft_format.read_adapter_metadata(directory), self.model, str(directory))
        self.add_adapter(adapter_name, _config_for_loading(config))
        expected = peft_format.adapter_tensors(self.model, adapter_name, config.bias, all_layer_types())
        try:
            peft_format.copy_into_model(expected, weights, str(directory))
        except LorakitError:
            self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            for param in expected.values():
                param.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False) -> "LoraModel":
        """peft's ``PeftModel.from_pretrained(base, dir)``."""
        wrapper = cls.__new__(cls)
        nn.Module.__init__(wrapper)
        wrapper.model = model
        wrapper.peft_config = {}
        wrapper.active_adapter = adapter_name
        wrapper._training_hooks = {}
        trainable = [param for param in model.parameters() if param.requires_grad]
        for param in trainable:
            param.requires_grad_(False)
        try:
            wrapper.load_adapter(directory, adapter_name, is_trainable)
        except LorakitError:
            wrapper._unwrap(merge=False)  # give the caller back its model unchanged
            for param in trainable:
                param.requires_grad_(True)
            raise
        return wrapper


def _config_for_loading(config):
    """Loaded weights overwrite the init, so skip expensive or weight-changing inits
    (e.g. PiSSA's SVD, which would also rewrite the base weight)."""
    if getattr(config, "init_lora_weights", True) not in (True, False, "gaussian"):
        return dataclasses.replace(config, init_lora_weights=True)
    return config
