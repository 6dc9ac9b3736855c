"""Model config: which Qwen-VL checkpoint architecture to build and how (precision, layers, freezing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_vcap.config.loader import ConfigError


@dataclass
class ModelConfig:
    # A Hugging Face model directory (config.json, tokenizer, processor files) or a config.json.
    # Empty means: the job supplies one (the demo builds a tiny model).
    hf_path: str = ""
    params_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    # Layer implementation: "auto" picks Transformer Engine when TE and CUDA are present.
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    # FP8 through Transformer Engine (H100): None disables it.
    fp8: Literal["e4m3", "hybrid"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    fp8_amax_history_len: int = 1024
    freeze_vision: bool = False
    freeze_merger: bool = False
    # Activation recomputation of whole layers ("full") or none.
    recompute: Literal["none", "full", "selective"] = "none"

    def validate(self) -> None:
        if self.fp8 is not None and self.transformer_impl == "local":
            raise ConfigError("fp8: needs transformer_impl 'auto' or 'transformer_engine'")
        if self.fp8_amax_history_len < 1:
            raise ConfigError("fp8_amax_history_len: must be >= 1")
