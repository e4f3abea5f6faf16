"""lorakit models in TRL's trainers: ``SFTTrainer`` and ``DPOTrainer`` that save, checkpoint and
resume them in peft's layout, without peft.

    from lorakit.integrations.trl import SFTTrainer
    trainer = SFTTrainer(model=get_peft_model(base, LoraConfig(...)), args=SFTConfig(...),
                         train_dataset=chat_rows, processing_class=tokenizer)

Each class is TRL's own with ``lorakit.integrations.transformers.AdaptedModelTrainer`` in front (the
files and resume; see that module for why the seam is there). One more thing differs for an
adapted model and is handled here: SFTTrainer's default ``loss_type="chunked_nll"`` replaces the
``forward`` of the model it is given with one that runs ``model.base_model`` (the decoder) and the
output head in chunks. For a peft model TRL patches the causal LM inside (``get_base_model()``); it
does not know a lorakit model is the same kind of wrapper and patches the wrapper, whose
``base_model`` is the wrapper itself (peft's meaning), so the first step fails. ``SFTTrainer`` moves
the patch onto the causal LM inside, as TRL does for peft: the adapters live in its module tree, so
the chunked loss trains them as before (an adapted output head is refused, as TRL refuses it for
peft: the chunked loss reads ``lm_head.weight`` itself).

``DPOTrainer`` needs a reference model. With a peft model TRL uses the model itself with its
adapter switched off (or a frozen copy of an adapter it was given); without one it loads a
second full model from ``model.config``'s name. For a lorakit model the reference is
``AdapterOffReference``: the model being trained, called with its adapters disabled, so the
reference costs no memory and is exactly the base (``AdaptedModel.disable_adapter``). An adapter
that starts trained (not B = 0) therefore has the base as its reference, not its starting
point; pass ``ref_model=`` to choose another.
"""

from __future__ import annotations

from torch import nn

from lorakit.adapters.contract import AdaptedModel, AdapterLayer
from lorakit.errors import LorakitError

try:
    import trl
    from trl.trainer import sft_trainer as _trl_sft
except ImportError:
    raise LorakitError("lorakit.integrations.trl needs TRL; install it with: pip install 'lorakit[trl]'") from None

from lorakit.integrations.transformers import with_adapters
from lorakit.models.modules_to_save import ModulesToSaveWrapper

__all__ = ["AdapterOffReference", "DPOTrainer", "SFTTrainer"]


def _move_chunked_loss_patch(trainer) -> None:
    """Put TRL's chunked-loss ``forward`` on the inner causal LM instead of the adapted wrapper.

    TRL assigns the patched forward as an instance attribute (``model.forward = ...``), so the
    wrapper's own ``forward`` comes back by deleting it."""
    model = trainer.model
    if not isinstance(model, AdaptedModel) or "forward" not in vars(model):
        return
    del model.forward
    head = model.model.get_output_embeddings()
    if isinstance(head, (AdapterLayer, ModulesToSaveWrapper)):
        # TRL refuses this for peft too: the chunked loss multiplies by lm_head.weight itself
        raise LorakitError("SFTTrainer's loss_type='chunked_nll' reads the output head's weight directly and would "
                           "skip the adapter on lm_head; set SFTConfig(loss_type='nll') or leave lm_head unadapted")
    _trl_sft._patch_chunked_ce_lm_head(model.model, chunk_size=_trl_sft._CHUNKED_LM_HEAD_CHUNK_SIZE,
                                       is_vlm=trainer._is_vlm)


class SFTTrainer(with_adapters(trl.SFTTrainer)):
    """TRL's ``SFTTrainer`` for lorakit models (module docstring); other models as in TRL."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _move_chunked_loss_patch(self)


class AdapterOffReference(nn.Module):
    """A DPO reference model that is the adapted model with its adapters disabled.

    forward(**batch) = model(**batch) inside ``model.disable_adapter()``: the base model's output,
    computed by the same modules (no second copy). The adapted model is held outside this module's
    tree (in a tuple), so what a trainer does to its reference model (``eval()``, ``to(device)``,
    turning dropout off, freezing its parameters) never reaches the model being trained."""

    def __init__(self, model: AdaptedModel):
        super().__init__()
        self._adapted = (model,)

    def forward(self, *args, **kwargs):
        model = self._adapted[0]
        with model.disable_adapter():
            return model(*args, **kwargs)


class DPOTrainer(with_adapters(trl.DPOTrainer)):
    """TRL's ``DPOTrainer`` for lorakit models: the reference is the model with its adapters off
    unless ``ref_model`` is given (module docstring); other models as in TRL."""

    def __init__(self, model, ref_model=None, *args, **kwargs):
        if ref_model is None and isinstance(model, AdaptedModel):
            ref_model = AdapterOffReference(model)
        super().__init__(model, ref_model, *args, **kwargs)
