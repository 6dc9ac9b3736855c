"""Model shapes for the planner: from a Hugging Face ``config.json`` or a built-in table.

The planner must work on a login node before any weights are downloaded, so a model folder
named like a known release (``Qwen2-VL-7B-Instruct``) is planned from the published shapes when
it has no ``config.json`` yet. Parameter counts are exact for the architectures we build
(Qwen2-VL: LayerNorm + GELU vision MLP; Qwen2.5-VL: RMSNorm + SwiGLU vision MLP, biases as in
the Hugging Face checkpoints).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_vcap.config.loader import ConfigError


@dataclass(frozen=True)
class ModelShape:
    arch: str  # "qwen2_vl" | "qwen2_5_vl"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied_embeddings: bool
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int
    vision_out: int  # merger output = LM hidden
    patch: int = 14
    temporal_patch: int = 2
    merge: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def lm_layer_params(self) -> int:
        h, dh = self.hidden, self.head_dim
        qkv_out = (self.heads + 2 * self.kv_heads) * dh
        attn = h * qkv_out + qkv_out + self.heads * dh * h  # fused QKV with bias, o-proj
        mlp = 3 * h * self.ffn  # SwiGLU gate, up, down (no biases)
        return attn + mlp + 2 * h  # two RMSNorms

    def lm_params(self) -> int:
        embed = self.vocab * self.hidden
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.layers * self.lm_layer_params() + embed + head + self.hidden

    def vision_block_params(self) -> int:
        hv, fv = self.vision_hidden, self.vision_ffn
        attn = 3 * hv * hv + 3 * hv + hv * hv + hv  # qkv and proj, with biases
        if self.arch == "qwen2_vl":
            return attn + (hv * fv + fv) + (fv * hv + hv) + 4 * hv  # fc1, fc2; 2 LayerNorms
        return attn + 2 * (hv * fv + fv) + (fv * hv + hv) + 2 * hv  # gate, up, down; 2 RMSNorms

    def patch_embed_params(self) -> int:
        return 3 * self.temporal_patch * self.patch * self.patch * self.vision_hidden

    def merger_params(self) -> int:
        wide = self.vision_hidden * self.merge * self.merge
        norm = 2 * self.vision_hidden if self.arch == "qwen2_vl" else self.vision_hidden
        return norm + wide * wide + wide + wide * self.vision_out + self.vision_out

    def vision_params(self) -> int:
        """Patch embedding + blocks (the merger is counted separately)."""
        return self.patch_embed_params() + self.vision_layers * self.vision_block_params()

    def total_params(self) -> int:
        return self.lm_params() + self.vision_params() + self.merger_params()


# Published config.json values of the released checkpoints (Hugging Face, Qwen organisation).
_QWEN2_VL_VISION = dict(vision_hidden=1280, vision_layers=32, vision_heads=16, vision_ffn=5120)
KNOWN_SHAPES: dict[str, ModelShape] = {
    "qwen2-vl-2b": ModelShape("qwen2_vl", 1536, 28, 12, 2, 8960, 151936, True,
                              vision_out=1536, **_QWEN2_VL_VISION),
    "qwen2-vl-7b": ModelShape("qwen2_vl", 3584, 28, 28, 4, 18944, 152064, False,
                              vision_out=3584, **_QWEN2_VL_VISION),
    "qwen2-vl-72b": ModelShape("qwen2_vl", 8192, 80, 64, 8, 29568, 152064, False,
                               vision_out=8192, **_QWEN2_VL_VISION),
    "qwen2.5-vl-3b": ModelShape("qwen2_5_vl", 2048, 36, 16, 2, 11008, 151936, True, 1280, 32, 16,
                                3420, 2048),
    "qwen2.5-vl-7b": ModelShape("qwen2_5_vl", 3584, 28, 28, 4, 18944, 152064, False, 1280, 32,
                                16, 3420, 3584),
    "qwen2.5-vl-32b": ModelShape("qwen2_5_vl", 5120, 64, 40, 8, 27648, 152064, False, 1280, 32,
                                 16, 3456, 5120),
    "qwen2.5-vl-72b": ModelShape("qwen2_5_vl", 8192, 80, 64, 8, 29568, 152064, False, 1280, 32,
                                 16, 3456, 8192),
}  # fmt: skip


def shape_from_hf_config(cfg: dict, where: str) -> ModelShape:
    arch = cfg.get("model_type")
    if arch not in ("qwen2_vl", "qwen2_5_vl"):
        raise ConfigError(f"{where}: model_type {arch!r} is not qwen2_vl or qwen2_5_vl")
    text = cfg.get("text_config") or cfg  # transformers 5 nests the LM under text_config
    v = cfg["vision_config"]
    if arch == "qwen2_vl":
        hv = v["embed_dim"]
        fv = int(hv * v.get("mlp_ratio", 4))
        out = v.get("hidden_size", text["hidden_size"])
    else:
        hv, fv, out = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]
    return ModelShape(
        arch,
        text["hidden_size"],
        text["num_hidden_layers"],
        text["num_attention_heads"],
        text.get("num_key_value_heads", text["num_attention_heads"]),
        text["intermediate_size"],
        text.get("vocab_size", cfg.get("vocab_size")),
        bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        hv,
        v["depth"],
        v["num_heads"],
        fv,
        out,
        v.get("patch_size", 14),
        v.get("temporal_patch_size", 2),
        v.get("spatial_merge_size", 2),
    )


def load_shape(hf_path: str) -> tuple[ModelShape, str]:
    """(shape, where it came from): the folder's config.json, else the release named by it."""
    path = Path(hf_path)
    config = path / "config.json"
    if config.is_file():
        return shape_from_hf_config(json.loads(config.read_text()), str(config)), str(config)
    name = path.name.lower().removesuffix("-instruct")
    if name in KNOWN_SHAPES:
        return KNOWN_SHAPES[name], f"published shape of {path.name} (no {config})"
    raise ConfigError(
        f"model.hf_path: {config} not found, and '{path.name}' is not a known release "
        f"({', '.join(sorted(KNOWN_SHAPES))}); point it at a folder with config.json"
    )
