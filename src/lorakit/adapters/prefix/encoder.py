"""The prefix encoder (peft's ``PrefixEncoder`` layout), the prefix as a KV cache, and the
attention mask that keeps packed samples apart over it.

    E = embedding.weight                              (P, L * 2 * D)    without projection
    E = W2 tanh(W1 e + b1) + b2,  e = embedding.weight (P, D) -> (P, L * 2 * D)   with projection

D = token_dim = kv_heads * head_dim, L = layers. Row p of E, viewed as (2L, kv_heads, head_dim),
holds layer l's key at 2l and value at 2l + 1 (peft's order), so the files move both ways.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices

from lorakit.errors import LorakitError


class PrefixEncoder(nn.Module):
    """P virtual tokens -> the flat prefix E (P, L * 2 * D); see the module docstring.

    projected False: E itself is the parameter (what peft trains, and what every adapter file
    holds). projected True: a (P, D) table and the two-layer MLP ``transform`` are trained."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, num_layers: int, projected: bool = False,
                 encoder_hidden_size: int | None = None, zero_init: bool = False):
        super().__init__()
        width = num_layers * 2 * token_dim
        self.projected = projected
        if projected:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, encoder_hidden_size or token_dim), nn.Tanh(),
                                           nn.Linear(encoder_hidden_size or token_dim, width))
            if zero_init:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width)  # N(0, 1) init, as peft's
            if zero_init:
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        """E, (P, L * 2 * D)."""
        if self.projected:
            return self.transform(self.embedding.weight)
        return self.embedding.weight


def prefix_cache(flat: torch.Tensor, batch_size: int, num_layers: int, num_heads: int,
                 cache: DynamicCache | None = None, model_config=None) -> DynamicCache:
    """The prefix E (P, L * 2 * D) as layer l's key and value, each (B, kv_heads, P, head_dim),
    written into ``cache`` (an empty DynamicCache, e.g. the one ``generate`` made) or into a new
    DynamicCache laid out for ``model_config`` (sliding-window layers stay sliding). Every row of
    the batch holds the same prefix, so the gradient of E sums over the rows."""
    num_tokens = flat.shape[0]
    kv = flat.view(num_tokens, 2 * num_layers, num_heads, -1).permute(1, 2, 0, 3)  # (2L, H, P, hd)
    kv = kv.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)                          # (2L, B, H, P, hd)
    if cache is None:
        cache = DynamicCache(config=model_config)
    for layer in range(num_layers):
        cache.update(kv[2 * layer], kv[2 * layer + 1], layer)  # the layer copies the view (torch.cat)
    return cache


def packed_prefix_mask(model_config, cache: DynamicCache, position_ids: torch.Tensor, dtype: torch.dtype):
    """For a packed batch (no attention_mask; position_ids restart at 0 at each sample): the 4-D
    mask over [prefix; tokens] in which every token sees the prefix and, causally, the tokens of
    its own sample; None when the batch is not packed. transformers separates packed samples
    itself only when no cache is given, and the prefix is a cache, so the mask is made here, by
    transformers' own mask builder for the model's attention implementation."""
    samples = find_packed_sequence_indices(position_ids)  # (B, T) sample number of each token, or None
    if samples is None:
        return None
    sliding = [t for t in getattr(model_config, "layer_types", None) or [] if t != "full_attention"]
    if sliding or getattr(model_config, "sliding_window", None) is not None:
        raise LorakitError("prefix tuning cannot train on packed batches of a model with sliding-window attention; "
                           "set data.packing: false")
    count = cache.get_seq_length()
    owner = torch.cat([samples.new_full((samples.shape[0], count), -1), samples], dim=1)  # (B, P + T); -1: prefix

    def prefix_or_same_sample(batch_idx, head_idx, q_idx, kv_idx):  # q_idx counts from P (the cache's length)
        return (kv_idx < count) | (owner[batch_idx, kv_idx] == owner[batch_idx, q_idx])

    stub = torch.empty(*samples.shape, 0, dtype=dtype, device=samples.device)  # only its shape, dtype and device
    mask = create_causal_mask(model_config, stub, None, cache, and_mask_function=prefix_or_same_sample)
    if mask is None or len(mask.shape) != 4:
        raise LorakitError(f"prefix tuning cannot train on packed batches with attention implementation "
                           f"'{model_config._attn_implementation}'; set data.packing: false")
    return mask
