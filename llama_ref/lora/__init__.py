"""LoRA: the adapter layer (``layer``), putting it into a Llama and merging it (``apply``), and adapter files in our
format and PEFT's (``adapter``)."""
from .apply import (apply_lora_to_llama, count_parameters, lora_layers, mark_only_lora_as_trainable, merge_and_unload,
                    merge_lora, unmerge_lora)
from .layer import ALL_TARGETS, ATTENTION_TARGETS, FFN_TARGETS, LoRALayer, LoRALinear

__all__ = ["ALL_TARGETS", "ATTENTION_TARGETS", "FFN_TARGETS", "LoRALayer", "LoRALinear", "apply_lora_to_llama",
           "count_parameters", "lora_layers", "mark_only_lora_as_trainable", "merge_and_unload", "merge_lora",
           "unmerge_lora"]
