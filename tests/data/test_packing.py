"""Packing is exact: per-token losses of a packed batch equal those of the same samples unpacked."""

import pytest
import torch

from lorakit.data import IGNORE_INDEX, make_batches, verify_packing
from lorakit.data.batching import resolve_packing
from lorakit.errors import LorakitError
from tiny_models import ARCHS, VOCAB, tiny_model

PACK_ATOL = 1e-4


def _samples(seed=0, count=7):
    """Random samples of varied length; the first tokens of each play the masked prompt."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        n = int(torch.randint(4, 20, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        prompt = int(torch.randint(0, n - 2, (1,), generator=g))
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return samples


def _token_losses(model, batch) -> dict[tuple, float]:
    """{(token ids of the sample so far): loss of its next labelled token} for every labelled position;
    the key identifies a position by its sample prefix, which packed and unpacked batches share."""
    logits = model(**batch).logits.float()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                               ignore_index=IGNORE_INDEX, reduction="none")
    starts = batch["position_ids"] if "position_ids" in batch else torch.arange(logits.shape[1]).expand(len(logits), -1)
    result = {}
    for row in range(len(logits)):
        ids = batch["input_ids"][row].tolist()
        for t in range(1, len(ids)):
            if batch["labels"][row, t] != IGNORE_INDEX:
                first = t - int(starts[row, t])
                result[tuple(ids[first:t + 1])] = losses[row, t - 1].item()
    return result


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked(arch, attn):
    model = tiny_model(arch)
    model.set_attn_implementation(attn)
    model.train()  # training mode, as in the loop; dropout off so the forward is deterministic (GPT-2 has 0.1)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    samples = _samples()
    packed = make_batches(samples, batch_size=2, pad_token_id=0, packing=True, max_seq_len=40, shuffle=True, seed=3)
    padded = make_batches(samples, batch_size=3, pad_token_id=0, packing=False, max_seq_len=40, shuffle=False, seed=0)
    assert len(packed) < len(padded) and any(int((b["position_ids"] == 0).sum()) > len(b["input_ids"]) for b in packed)
    got, want = {}, {}
    for batch in packed:
        got.update(_token_losses(model, batch))
    for batch in padded:
        want.update(_token_losses(model, batch))
    # every labelled token is trained on exactly once in both layouts, except each sample's first token
    assert set(got) == set(want) and len(got) == sum(sum(l != IGNORE_INDEX for l in s["labels"][1:]) for s in samples)
    diff = max(abs(got[k] - want[k]) for k in want)
    assert diff < PACK_ATOL, f"{arch}/{attn}: packed per-token losses differ by {diff}"
    verify_packing(model)  # the runtime check agrees


def test_packing_needs_use_cache_false():
    """Why batches carry use_cache=False: without it transformers builds a cache, skips the
    packed-sequence mask, and attention leaks across samples (this test fails if that changes,
    which would be good news)."""
    model = tiny_model("llama")
    batch = make_batches(_samples(), batch_size=2, pad_token_id=0, packing=True, max_seq_len=40, shuffle=False, seed=0)[0]
    exact = model(**batch).logits
    leaky = model(**{k: v for k, v in batch.items() if k != "use_cache"}).logits
    assert (exact - leaky).abs().max() > 1e-2


def test_packed_and_padded_mean_loss_match():
    model = tiny_model("llama")
    samples = _samples(count=4)
    packed = make_batches(samples, batch_size=4, pad_token_id=0, packing=True, max_seq_len=200, shuffle=False, seed=0)
    padded = make_batches(samples, batch_size=4, pad_token_id=0, packing=False, max_seq_len=200, shuffle=False, seed=0)
    assert len(packed) == len(padded) == 1 and packed[0]["input_ids"].shape[0] == 1
    torch.testing.assert_close(model(**packed[0]).loss, model(**padded[0]).loss, atol=PACK_ATOL, rtol=0)


def test_batch_layout_and_determinism():
    samples = _samples()
    packed = make_batches(samples, batch_size=2, pad_token_id=0, packing=True, max_seq_len=40, shuffle=True, seed=5)
    again = make_batches(samples, batch_size=2, pad_token_id=0, packing=True, max_seq_len=40, shuffle=True, seed=5)
    other = make_batches(samples, batch_size=2, pad_token_id=0, packing=True, max_seq_len=40, shuffle=True, seed=6)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(packed, again))
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(packed, other))
    for batch in packed:
        assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"} and batch["input_ids"].shape[1] <= 40
        assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape
    padded = make_batches(samples, batch_size=3, pad_token_id=7, packing=False, max_seq_len=40, shuffle=False, seed=0)
    first = padded[0]
    assert set(first) == {"input_ids", "labels", "attention_mask", "use_cache"} and first["input_ids"].shape[0] == 3
    for row, sample in enumerate(samples[:3]):
        n = len(sample["input_ids"])
        assert first["input_ids"][row, :n].tolist() == sample["input_ids"] and first["attention_mask"][row].sum() == n
        assert (first["input_ids"][row, n:] == 7).all() and (first["labels"][row, n:] == IGNORE_INDEX).all()


class _IgnoresPositions(torch.nn.Module):
    """A model that drops position_ids, like an architecture that cannot take packed rows."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model("llama")
        self.config = self.inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, position_ids=None, **kwargs):
        return self.inner(**kwargs)


def test_verify_packing_passes_through_lora_wrapper():
    from lorakit import LoraConfig, get_lora_model

    model = get_lora_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    verify_packing(model)
    assert model.training  # mode restored


def test_verify_packing_rejects_models_where_it_is_not_exact():
    with pytest.raises(LorakitError, match="packing is not exact for model type 'llama'.*set data.packing: false"):
        verify_packing(_IgnoresPositions())


def test_resolve_packing_auto_follows_the_check_and_passes_bools_through():
    assert resolve_packing("auto", tiny_model("llama")) is True
    assert resolve_packing("auto", _IgnoresPositions()) is False  # no error: auto turns packing off
    assert resolve_packing(True, tiny_model("llama")) is True
    with pytest.raises(LorakitError, match="packing is not exact"):  # an explicit true that cannot hold fails
        resolve_packing(True, _IgnoresPositions())
    assert resolve_packing(False, tiny_model("llama")) is False
    with pytest.raises(LorakitError, match="data.packing must be true, false or auto, got 'yes'"):
        resolve_packing("yes", tiny_model("llama"))


def _ignoring_positions(model):
    wrapper = _IgnoresPositions.__new__(_IgnoresPositions)
    torch.nn.Module.__init__(wrapper)
    wrapper.inner, wrapper.config = model, model.config
    return wrapper


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["bf16", "qlora-bf16"])
def test_verify_packing_in_bf16_on_builtin_model_has_no_false_refusal(setup, builtin_model_dir):
    """bf16 rounds the logits to 8 mantissa bits: a correct packed path differs from the unpacked one
    by ~0.3 in the log-probs of unlikely tokens (a false refusal at a fp32 tolerance), while a path
    that attends across samples is still refused."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir, dtype=torch.bfloat16)
    if setup == "qlora-bf16":
        pytest.importorskip("bitsandbytes")
        from lorakit.adapters.qlora import quantize_base

        model = quantize_base(model, "nf4", compute_dtype="bfloat16")
    verify_packing(model)
    with pytest.raises(LorakitError, match="not exact.*total variation distance"):
        verify_packing(_ignoring_positions(model))
