"""lorakit models in transformers' ``Trainer``: checkpoints, ``save_model`` and resume, in peft's layout.

    from lorakit import LoraConfig, get_peft_model
    from lorakit.integrations.transformers import Trainer        # transformers.Trainer, adapter-aware

    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainer = Trainer(model=model, args=TrainingArguments("out", save_steps=50), train_dataset=...)
    trainer.train()                              # out/checkpoint-50/adapter_model.safetensors, ...
    trainer.save_model()                         # out/adapter_config.json + adapter_model.safetensors
    trainer.train(resume_from_checkpoint=True)   # adapter weights here; optimizer, scheduler, RNG by Trainer

Why a Trainer subclass and not the model alone. transformers 5's Trainer picks how to save and
resume by the model's class: a ``PreTrainedModel`` gets ``save_pretrained``; peft's ``PeftModel``
gets ``save_pretrained`` and, on resume, ``load_adapter``; any other module has its whole
``state_dict()`` written to ``model.safetensors`` (which safetensors refuses for a tied
``embed_tokens`` / ``lm_head``, leaving an empty ``checkpoint-N/``) and is resumed from a sharded
index it never wrote. The peft branch is an ``isinstance`` test on peft's own class, taken only
when peft is installed, so a model that does not import peft cannot take it, and a model posing as
a ``PreTrainedModel`` would save but still not resume. The choice is made in three Trainer methods
(``_save``, ``_load_from_checkpoint``, ``_load_best_model``), so ``AdaptedModelTrainer`` overrides
those three for any model that implements ``lorakit.adapters.contract.AdaptedModel`` (every lorakit
method) and hands every other model to Trainer unchanged. It is a mixin rather than a copy of
Trainer because TRL's trainers are Trainer subclasses: ``with_adapters(cls)`` puts the same
methods in front of any of them (``lorakit.integrations.trl``). Nothing here imports peft.

What a save writes (Trainer adds its own optimizer / scheduler / RNG / state files to a checkpoint):

* ``checkpoint-N/``: the model's ``save_checkpoint_files``, the adapter in peft's layout exactly as
  it is in memory (and a method's training state, e.g. AdaLoRA's allocator), which resume reads
  back with ``load_checkpoint_files``.
* ``save_model()``: the model's ``save_pretrained``, the method's published files (peft's layout
  for LoRA and its variants), with the tokenizer and ``training_args.bin`` as Trainer writes them.

Two introspections Trainer makes on the model are redirected to the causal LM inside, because an
adapted model's ``forward(*args, **kwargs)`` passes everything on to it: the dataset columns kept
for ``forward`` (``remove_unused_columns``) and the label names (without them evaluation reports
no ``eval_loss``). After every optimizer step the model's ``after_optimizer_step`` runs (the
contract's hook: AdaLoRA's rank allocation; a no-op for LoRA).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from lorakit.adapters.contract import AdaptedModel
from lorakit.errors import LorakitError

__all__ = ["AdaptedModelTrainer", "Trainer", "with_adapters"]


class _AfterOptimizerStep(TrainerCallback):
    """Calls the AdaptedModel contract's ``after_optimizer_step`` with the 1-based step number
    (Trainer fires ``on_optimizer_step`` after ``optimizer.step()``, before it counts the step)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.after_optimizer_step(state.global_step + 1)


class AdaptedModelTrainer:
    """Mixin for a ``transformers.Trainer`` subclass: saves, checkpoints and resumes a lorakit
    ``AdaptedModel`` through its own files (see module docstring); any other model goes to the
    Trainer class behind it untouched. Use ``with_adapters(trainer_class)`` to build the class."""

    _writing_checkpoint = False  # True only inside _save_checkpoint

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self._adapted_model()
        if model is None:
            return
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise LorakitError("lorakit models train in Trainer on one device or with DDP; DeepSpeed and FSDP "
                               "shard the adapter, which this integration does not gather: turn them off")
        inner = type(model.model)  # the causal LM whose forward gets the batch
        if self.args.label_names is None:
            self.label_names = find_labels(inner)
        self.can_return_loss = can_return_loss(inner)
        self.add_callback(_AfterOptimizerStep())

    def _adapted_model(self) -> AdaptedModel | None:
        model = getattr(self, "model", None)
        return model if isinstance(model, AdaptedModel) else None

    # --- what Trainer keeps of a dataset ------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        """Trainer keeps the dataset columns named in ``self.model.forward``'s signature; an
        adapted model's is ``(*args, **kwargs)``, so let it read the inner causal LM's. A subclass
        that names its columns itself (TRL's trainers) is still the one that decides."""
        model = self._adapted_model()
        if model is None or self._signature_columns is not None:
            return super()._set_signature_columns_if_needed()
        self.model = model.model
        try:
            super()._set_signature_columns_if_needed()
        finally:
            self.model = model

    # --- saving --------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        # Trainer writes a checkpoint's model files through the same _save as save_model(); the
        # flag tells _save which of the model's two writers this is.
        self._writing_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._writing_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter's files instead of the whole model's ``state_dict`` (``state_dict``, which
        Trainer passes only for sharded setups refused in ``__init__``, is not needed: the
        adapter is read from the live parameters)."""
        model = self._adapted_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:  # only the main process writes
            return
        directory = Path(output_dir if output_dir is not None else self.args.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        if self._writing_checkpoint:
            model.save_checkpoint_files(directory)
        else:
            model.save_pretrained(directory)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(directory)
        torch.save(self.args, directory / TRAINING_ARGS_NAME)

    # --- loading -------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume: the adapter (and a method's training state) from ``checkpoint-N/``; Trainer
        then restores the optimizer, scheduler and RNG from the same directory itself."""
        adapted = self._adapted_model()
        if adapted is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        adapted.load_checkpoint_files(Path(resume_from_checkpoint))

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the adapter of the best checkpoint, back into the model."""
        adapted = self._adapted_model()
        if adapted is None:
            return super()._load_best_model()
        adapted.load_checkpoint_files(Path(self.state.best_model_checkpoint))


@functools.cache
def with_adapters(trainer_class: type) -> type:
    """``trainer_class`` (``transformers.Trainer`` or a subclass, such as TRL's) with
    ``AdaptedModelTrainer`` in front: same constructor, same behaviour for other models.
    The same class comes back for the same argument."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, transformers.Trainer)):
        raise LorakitError(f"with_adapters needs transformers.Trainer or a subclass of it, got {trainer_class!r}")
    return type(trainer_class.__name__, (AdaptedModelTrainer, trainer_class),
                {"__module__": __name__, "__doc__": f"{trainer_class.__qualname__} that saves and resumes "
                                                    f"lorakit models in peft's layout (AdaptedModelTrainer)."})


Trainer = with_adapters(transformers.Trainer)
