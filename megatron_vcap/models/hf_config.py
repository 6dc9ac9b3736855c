"""Reading a Hugging Face Qwen2-VL / Qwen2.5-VL ``config.json`` into one validated description.

``load_hf_config`` turns a model directory (or a ``config.json``) into the ``transformers`` config
object, checking first that the fields a model of that size cannot be built without are present
(``transformers`` would otherwise fill in the 72B defaults silently). ``describe_hf_config`` reads
that object into :class:`QwenVLSpec`, the flat set of numbers every other module uses; it is the
only code that knows where each field lives in the config (flat 4.x hub layout or nested 5.x
``text_config`` / ``vision_config``). Errors are :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_vcap.config.loader import ConfigError

Arch = Literal["qwen2_vl", "qwen2_5_vl"]
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl")

# Fields without which the model's size is unknown. Text fields may sit at the top level (hub
# configs written by transformers 4.x) or under "text_config" (transformers 5.x).
_REQUIRED_TEXT = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_REQUIRED_VISION = {
    "qwen2_vl": ("depth", "embed_dim", "num_heads", "hidden_size"),
    "qwen2_5_vl": ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size"),
}


@dataclass(frozen=True)
class QwenVLSpec:
    """Every number the Megatron model, mRoPE and the converter need, read from the HF config."""

    arch: Arch
    # Language model.
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    tie_word_embeddings: bool
    # Vision tower.
    vision_depth: int
    vision_hidden_size: int
    vision_num_heads: int
    vision_ffn_hidden_size: int
    vision_act: str
    vision_rope_theta: float
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    # Qwen2.5-VL only (None / () for Qwen2-VL).
    window_size: int | None
    fullatt_block_indexes: tuple[int, ...]
    tokens_per_second: float | None
    # Special tokens.
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden_size // self.vision_num_heads

    @property
    def merger_hidden_size(self) -> int:
        return self.vision_hidden_size * self.spatial_merge_size**2

    @property
    def uses_window_attention(self) -> bool:
        return self.arch == "qwen2_5_vl"


def _config_class(model_type: str):
    if model_type == "qwen2_vl":
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig


def check_raw_config(raw: dict, source: str = "config.json") -> str:
    """Check a raw config dict for the fields needed to size the model; returns its model_type."""
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source}: missing field 'model_type'")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type '{model_type}' is not supported "
            f"(expected one of {list(SUPPORTED_MODEL_TYPES)})"
        )
    text = raw.get("text_config") or raw
    text_where = "text_config." if "text_config" in raw and raw["text_config"] else ""
    for key in _REQUIRED_TEXT:
        if key not in text:
            raise ConfigError(f"{source}: missing field '{text_where}{key}'")
    vision = raw.get("vision_config")
    if not isinstance(vision, dict):
        raise ConfigError(f"{source}: missing field 'vision_config'")
    for key in _REQUIRED_VISION[model_type]:
        if key not in vision:
            raise ConfigError(f"{source}: missing field 'vision_config.{key}'")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or raw.get("rope_scaling") or {}
    if "mrope_section" not in rope:
        raise ConfigError(
            f"{source}: missing field '{text_where}rope_parameters.mrope_section' "
            "(rope_scaling.mrope_section in transformers 4.x configs)"
        )
    return model_type


def load_hf_config(path: str | Path):
    """A HF model directory or its ``config.json`` -> ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig``.

    Raises :class:`ConfigError` naming the file and the missing or unsupported field.
    """
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file}: no such file (expected a HF model directory or config.json)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from None
    model_type = check_raw_config(raw, str(file))
    config = _config_class(model_type).from_dict(raw)
    try:
        describe_hf_config(config)  # validate the values too, before anyone builds from it
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("config:", f"{file}:", 1)) from None
    return config


def _get(cfg, name: str, where: str):
    value = getattr(cfg, name, None)
    if value is None:
        raise ConfigError(f"config: missing field '{where}{name}'")
    return value


def _text_fields(text) -> dict:
    """The language model's fields of QwenVLSpec, validated."""
    t = "text_config."
    rope = getattr(text, "rope_parameters", None) or {}
    if "mrope_section" not in rope:
        raise ConfigError(f"config: missing field '{t}rope_parameters.mrope_section'")
    mrope_section = tuple(int(x) for x in rope["mrope_section"])
    hidden = int(_get(text, "hidden_size", t))
    heads = int(_get(text, "num_attention_heads", t))
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    if len(mrope_section) != 3 or 2 * sum(mrope_section) != head_dim:
        raise ConfigError(
            f"config: '{t}rope_parameters.mrope_section' {list(mrope_section)} must have 3 "
            f"entries summing to head_dim/2 = {head_dim // 2}"
        )
    if rope.get("rope_type", "default") not in ("default", "mrope"):
        raise ConfigError(
            f"config: '{t}rope_parameters.rope_type' {rope.get('rope_type')!r} is not supported "
            "(only the default mRoPE)"
        )
    if heads % kv_heads != 0:
        raise ConfigError(
            f"config: '{t}num_attention_heads' ({heads}) must be a multiple of "
            f"'{t}num_key_value_heads' ({kv_heads})"
        )
    if getattr(text, "use_sliding_window", False):
        raise ConfigError(f"config: '{t}use_sliding_window' = true is not supported")
    if getattr(text, "hidden_act", "silu") != "silu":
        raise ConfigError(f"config: '{t}hidden_act' {text.hidden_act!r} is not supported (silu)")
    return dict(
        vocab_size=int(_get(text, "vocab_size", t)),
        hidden_size=hidden,
        ffn_hidden_size=int(_get(text, "intermediate_size", t)),
        num_layers=int(_get(text, "num_hidden_layers", t)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_get(text, "rms_norm_eps", t)),
        rope_theta=float(rope.get("rope_theta", 1_000_000.0)),
        mrope_section=mrope_section,
        max_position_embeddings=int(getattr(text, "max_position_embeddings", 32768)),
    )


def _vision_fields(vision, model_type: str, lm_hidden: int) -> dict:
    """The vision tower's fields of QwenVLSpec, validated."""
    v = "vision_config."
    if model_type == "qwen2_vl":
        v_hidden = int(_get(vision, "embed_dim", v))
        v_ffn = int(v_hidden * _get(vision, "mlp_ratio", v))
        out_hidden = int(_get(vision, "hidden_size", v))
        act, window_size, fullatt, tps = "quick_gelu", None, (), None
    else:
        v_hidden = int(_get(vision, "hidden_size", v))
        v_ffn = int(_get(vision, "intermediate_size", v))
        out_hidden = int(_get(vision, "out_hidden_size", v))
        act = "silu"
        window_size = int(_get(vision, "window_size", v))
        fullatt = tuple(int(i) for i in _get(vision, "fullatt_block_indexes", v))
        tps = float(_get(vision, "tokens_per_second", v))
    if vision.hidden_act != act:
        raise ConfigError(
            f"config: '{v}hidden_act' {vision.hidden_act!r} is not supported for {model_type} "
            f"(expected {act!r})"
        )
    if out_hidden != lm_hidden:
        raise ConfigError(
            f"config: the vision merger's output size ({out_hidden}) must equal "
            f"'text_config.hidden_size' ({lm_hidden})"
        )
    depth = int(_get(vision, "depth", v))
    if any(i < 0 or i >= depth for i in fullatt):
        raise ConfigError(f"config: '{v}fullatt_block_indexes' {list(fullatt)} out of range")
    v_heads = int(_get(vision, "num_heads", v))
    if v_hidden % v_heads != 0 or (v_hidden // v_heads) % 4 != 0:
        raise ConfigError(
            f"config: '{v}num_heads' ({v_heads}) must divide the vision hidden size ({v_hidden}) "
            "into heads whose size is a multiple of 4 (2D rotary embedding)"
        )
    v_rope = getattr(vision, "rope_parameters", None) or {}
    return dict(
        vision_depth=depth,
        vision_hidden_size=v_hidden,
        vision_num_heads=v_heads,
        vision_ffn_hidden_size=v_ffn,
        vision_act=act,
        vision_rope_theta=float(v_rope.get("rope_theta", 10000.0)),
        patch_size=int(_get(vision, "patch_size", v)),
        temporal_patch_size=int(_get(vision, "temporal_patch_size", v)),
        in_channels=int(getattr(vision, "in_channels", None) or getattr(vision, "in_chans", 3)),
        spatial_merge_size=int(_get(vision, "spatial_merge_size", v)),
        window_size=window_size,
        fullatt_block_indexes=fullatt,
        tokens_per_second=tps,
    )


def describe_hf_config(hf_config) -> QwenVLSpec:
    """The ``transformers`` config object -> :class:`QwenVLSpec`, validating supported values."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"config: model_type '{model_type}' is not supported "
            f"(expected one of {list(SUPPORTED_MODEL_TYPES)})"
        )
    text = _text_fields(hf_config.text_config)
    return QwenVLSpec(
        arch=model_type,
        **text,
        **_vision_fields(hf_config.vision_config, model_type, text["hidden_size"]),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        image_token_id=int(_get(hf_config, "image_token_id", "")),
        video_token_id=int(_get(hf_config, "video_token_id", "")),
        vision_start_token_id=int(_get(hf_config, "vision_start_token_id", "")),
    )


def check_parallel_layout(spec: QwenVLSpec, tp: int, pp: int) -> None:
    """Raise ConfigError, naming the config field, when the model does not split over TP x PP."""
    for value, field in (
        (spec.num_kv_heads, "text_config.num_key_value_heads"),
        (spec.vocab_size, "text_config.vocab_size"),
        (spec.ffn_hidden_size, "text_config.intermediate_size"),
        (spec.vision_num_heads, "vision_config.num_heads"),
        (spec.vision_ffn_hidden_size, "vision_config.intermediate_size / mlp_ratio"),
    ):
        if value % tp != 0:
            raise ConfigError(
                f"config: '{field}' ({value}) is not divisible by the tensor-parallel size {tp}"
            )
    if spec.num_layers % pp != 0:
        raise ConfigError(
            f"config: 'text_config.num_hidden_layers' ({spec.num_layers}) is not divisible by "
            f"the pipeline-parallel size {pp}"
        )
