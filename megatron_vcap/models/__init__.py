"""Qwen2-VL / Qwen2.5-VL as Megatron-Core modules and their layer specs."""
