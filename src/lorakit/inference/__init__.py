"""Inference with adapters: many adapters over one base, per-row mixed-adapter batches,
blending adapters, and continuous batching with a preallocated KV cache (used by the server)."""

from lorakit.inference.blend import blend_adapters
from lorakit.inference.continuous import ContinuousBatcher
from lorakit.inference.mixed import AdapterStacks, check_mixable, mixed_adapters
from lorakit.inference.multi_adapter import MultiAdapterModel

__all__ = ["AdapterStacks", "ContinuousBatcher", "MultiAdapterModel", "blend_adapters", "check_mixable",
           "mixed_adapters"]
