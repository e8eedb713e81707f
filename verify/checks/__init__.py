"""One check per property, each returning a CheckResult: ``kv_cache``, ``grad_accum``, ``lora_merge``,
``gradient_checkpointing``, ``mixed_precision`` (with the op-level dtype rules it applies, ``precision_policy``)."""
