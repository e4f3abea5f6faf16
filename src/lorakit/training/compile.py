"""``train.compile``: run the decoder blocks through ``torch.compile``, or say why not.

What compiling buys is fusion of the elementwise chain of a block (norms, rotary, SiLU-gate,
residual adds) into a few generated kernels; the matmuls, most of a LoRA step, are unchanged.
On CPU, inductor generates C++ and needs a C++ compiler; without one lorakit stays eager and
says so in one line. Measured on a 2-core AVX-512 host (SmolLM2-135M, LoRA r=16 on every linear
layer, batch 4 x 256): compiled blocks took 5.04 s per step against 4.75 s eager in fp32, and
12.1 s against 3.2 s in bf16, after 35-50 s of compilation. So ``auto`` compiles on GPUs
(where inductor's fused kernels are the usual win) and stays eager on CPUs; ``true`` compiles
anywhere a compiler exists (for hosts where it pays: measure with benchmarks/speed.py).

Each block is compiled separately (``module.compile()``, shapes dynamic after the first
change), so one compiled graph serves every layer and a failure in one falls back to eager
for that graph (``suppress_errors``) rather than stopping a run.
"""

from __future__ import annotations

import os
import shutil

from torch import nn

def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on CPU ($CXX, else g++ / clang++ / c++ on PATH), or None."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    return None


def decoder_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The ModuleList of a causal LM's decoder blocks (the one as long as config.num_hidden_layers)."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers and len(module) > 0:
            return module
    return None


def compile_blocks(lm: nn.Module, setting, device_type: str) -> str:
    """Compile ``lm``'s decoder blocks in place as ``setting`` (true | false | "auto") says on a
    ``device_type`` ("cpu", "cuda", ...) device. Returns one line saying what was done and why."""
    if setting is False:
        return "compile: off"
    if setting == "auto" and device_type == "cpu":
        return "compile auto -> eager (compiled decoder blocks measured slower than eager on CPU; train.compile=true forces it)"
    if device_type == "cpu" and cxx_compiler() is None:
        return "compile -> eager: no C++ compiler found ($CXX, g++, clang++), which torch.compile needs on CPU"
    blocks = decoder_blocks(lm)
    if blocks is None:
        return f"compile -> eager: no decoder block list found in {type(lm).__name__}"
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly
    for block in blocks:
        block.compile()
    return f"compile: {len(blocks)} decoder blocks through torch.compile (compiled on the first steps)"
