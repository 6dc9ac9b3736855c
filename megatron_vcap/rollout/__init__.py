"""KV-cached batched generation on the Megatron model."""
