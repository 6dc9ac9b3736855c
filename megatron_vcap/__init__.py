"""megatron_vcap: a Megatron-Core fork for video captioning with GRPO (VideoCap-R1)."""

__version__ = "0.1.0"
