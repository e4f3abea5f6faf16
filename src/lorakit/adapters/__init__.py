"""Training methods, registered by name with their declared hooks (see registry.py).

Layer methods (``wrap`` None) put adapter layers into the base and are managed by
``lorakit.models.LoraModel``; the others bring their own ``AdaptedModel`` wrapper (prefix tuning).
"""

from lorakit.adapters.adalora import (AdaLoraConfig, AdaLoraLayer, adalora_delta_factors, adalora_file_contents,
                                      adalora_set_total_steps, adalora_training_hooks, attach_adalora)
from lorakit.adapters.bottleneck import BottleneckConfig, BottleneckLayer, attach_bottleneck
from lorakit.adapters.contract import AdaptedModel, AdapterLayer, TrainingHooks
from lorakit.adapters.full import FullConfig, load_full, wrap_full
from lorakit.adapters.lora import LoraConfig, LoraLayer, attach_lora, lora_delta_factors, lora_file_contents
from lorakit.adapters.prompt import PromptConfig, load_prompt, prompt_eval_context, wrap_prompt
from lorakit.adapters.prefix import PrefixTuningConfig, load_prefix, wrap_prefix
from lorakit.adapters.qlora import QLoraConfig, attach_qlora, qlora_prepare_base, qlora_report
from lorakit.adapters.registry import (ADAPTER_METHODS, AdapterMethod, get_method, method_for_config,
                                       method_for_directory, method_for_peft_type, parameter_tables,
                                       register_method)

_LORA_TABLES = ("lora_A", "lora_B", "lora_magnitude_vector")

register_method(AdapterMethod(
    "lora", LoraConfig, wrap=None, peft_type="LORA", attach=attach_lora, layer_types=(LoraLayer,),
    parameter_tables=_LORA_TABLES, file_contents=lora_file_contents, delta_factors=lora_delta_factors,
    description="LoRA and its variants (rsLoRA, DoRA, PiSSA init, LoRA+) on a frozen base"))
register_method(AdapterMethod(  # LoRA over a 4-bit base: the base is quantized first, the files are LoRA's
    "qlora", QLoraConfig, wrap=None, peft_type="LORA", attach=attach_qlora, layer_types=(LoraLayer,),
    parameter_tables=_LORA_TABLES, file_contents=lora_file_contents, prepare_base=qlora_prepare_base,
    report=qlora_report, delta_factors=lora_delta_factors, quantized_base=True,
    description="LoRA over a 4-bit NF4 base (QLoRA)"))
register_method(AdapterMethod(
    "adalora", AdaLoraConfig, wrap=None, peft_type="ADALORA", attach=attach_adalora, layer_types=(AdaLoraLayer,),
    parameter_tables=("lora_A", "lora_B", "lora_E"), file_contents=adalora_file_contents,
    training_hooks=adalora_training_hooks, set_total_steps=adalora_set_total_steps,
    delta_factors=adalora_delta_factors,
    description="AdaLoRA: SVD-form LoRA whose rank budget is reallocated during training"))
register_method(AdapterMethod(  # lorakit-only files (peft has no bottleneck adapters); never merged
    "adapter", BottleneckConfig, wrap=None, peft_type="BOTTLENECK", attach=attach_bottleneck,
    layer_types=(BottleneckLayer,), parameter_tables=("adapter_down", "adapter_up"),
    description="bottleneck adapters (Houlsby / Pfeiffer): a small MLP after the sublayers' output projections"))
register_method(AdapterMethod(
    "full", FullConfig, wrap=wrap_full, load=load_full, output="model", saved_file="config.json",
    reference="frozen_copy",  # the base weights themselves train: nothing to switch off
    description="full fine-tuning: the base model's own weights train (fp32)"))
register_method(AdapterMethod(
    "prompt", PromptConfig, wrap=wrap_prompt, load=load_prompt, trains=False, output="prompt",
    saved_file="prompt_baseline.json", eval_context=prompt_eval_context,
    description="no training: k training examples in the prompt (few-shot)"))

register_method(AdapterMethod(
    "prefix", PrefixTuningConfig, wrap=wrap_prefix, load=load_prefix, peft_type="PREFIX_TUNING",
    description="prefix tuning: trained key/value vectors before every sequence in every attention layer"))

__all__ = ["ADAPTER_METHODS", "AdaptedModel", "AdapterLayer", "AdapterMethod", "BottleneckConfig", "BottleneckLayer",
           "FullConfig", "LoraConfig", "LoraLayer", "PrefixTuningConfig", "PromptConfig", "TrainingHooks", "get_method",
           "method_for_config", "method_for_directory", "method_for_peft_type", "parameter_tables", "register_method"]
