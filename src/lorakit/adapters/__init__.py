"""Adapter methods, registered by name (see registry.py)."""

from lorakit.adapters.adalora import AdaLoraConfig, AdaLoraLayer, attach_adalora
from lorakit.adapters.lora import LoraConfig, LoraLayer, attach_lora
from lorakit.adapters.qlora import QLoraConfig, attach_qlora
from lorakit.adapters.registry import (ADAPTER_METHODS, AdapterMethod, get_method, method_for_config,
                                       method_for_peft_type, register_method)

register_method(AdapterMethod("lora", "LORA", LoraConfig, attach_lora, (LoraLayer,)))
register_method(AdapterMethod("qlora", "LORA", QLoraConfig, attach_qlora, (LoraLayer,)))  # LoRA over an NF4 base
register_method(AdapterMethod("adalora", "ADALORA", AdaLoraConfig, attach_adalora, (AdaLoraLayer,)))

__all__ = ["ADAPTER_METHODS", "AdapterMethod", "LoraConfig", "LoraLayer", "get_method",
           "method_for_config", "method_for_peft_type", "register_method"]
