"""Hugging Face <-> Megatron weight conversion: a declarative mapping table plus TP/PP sharding."""
