"""The Hugging Face <-> Megatron weight mapping, as a table of rules.

Each :class:`Rule` pairs one Megatron tensor (named as in Megatron checkpoints, i.e. with the
Transformer Engine names for norms fused into the following linear layer) with the HF tensor(s)
it is made of, and names the transform between them:

* ``copy``       one HF tensor, same layout;
* ``qkv``        HF q / k / v projections <-> Megatron's fused QKV, laid out per query group
                 (the group's query heads, then its key head, then its value head);
* ``packed_qkv`` HF's single vision ``qkv`` [q; k; v] <-> the same per-group (= per-head) layout;
* ``glu``        HF gate and up projections <-> Megatron's ``linear_fc1`` = [gate; up].

Transforms work on full (TP-independent) tensors; :func:`shard_for_rank` cuts the slice a
tensor-parallel rank holds (for ``glu`` each half is cut separately, as Megatron shards it).
HF names are the ones ``transformers`` writes with ``save_pretrained`` (``model.layers.*``,
``visual.*``, ``lm_head.weight``); 5.x in-memory names (``model.language_model.*``,
``model.visual.*``) are accepted on input via :func:`normalize_hf_name`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from megatron_vcap.models.hf_config import QwenVLSpec
from megatron_vcap.models.specs import LOCAL_TO_TE_KEYS

Kind = Literal["copy", "qkv", "packed_qkv", "glu"]
LM_LAYER_PREFIX = "language_model.decoder.layers."


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: tuple[str, ...]
    kind: Kind = "copy"


def _lm_layer_rules(i: int) -> list[Rule]:
    m, h = f"{LM_LAYER_PREFIX}{i}.", f"model.layers.{i}."
    attn = h + "self_attn."
    return [
        Rule(m + "self_attention.linear_qkv.layer_norm_weight", (h + "input_layernorm.weight",)),
        Rule(
            m + "self_attention.linear_qkv.weight",
            (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
            "qkv",
        ),
        Rule(
            m + "self_attention.linear_qkv.bias",
            (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"),
            "qkv",
        ),
        Rule(m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",)),
        Rule(m + "mlp.linear_fc1.layer_norm_weight", (h + "post_attention_layernorm.weight",)),
        Rule(
            m + "mlp.linear_fc1.weight",
            (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
            "glu",
        ),
        Rule(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",)),
    ]


def _vision_block_rules(spec: QwenVLSpec, i: int) -> list[Rule]:
    m, h = f"vision.blocks.{i}.", f"visual.blocks.{i}."
    params = ("weight", "bias")
    norm_params = ("weight", "bias") if spec.arch == "qwen2_vl" else ("weight",)  # LayerNorm
    rules = [
        Rule(m + f"self_attention.linear_qkv.layer_norm_{p}", (h + f"norm1.{p}",))
        for p in norm_params
    ]
    rules += [
        Rule(m + f"self_attention.linear_qkv.{p}", (h + f"attn.qkv.{p}",), "packed_qkv")
        for p in params
    ]
    rules += [Rule(m + f"self_attention.linear_proj.{p}", (h + f"attn.proj.{p}",)) for p in params]
    rules += [Rule(m + f"mlp.linear_fc1.layer_norm_{p}", (h + f"norm2.{p}",)) for p in norm_params]
    for p in params:
        if spec.arch == "qwen2_vl":
            rules.append(Rule(m + f"mlp.linear_fc1.{p}", (h + f"mlp.fc1.{p}",)))
            rules.append(Rule(m + f"mlp.linear_fc2.{p}", (h + f"mlp.fc2.{p}",)))
        else:
            rules.append(
                Rule(
                    m + f"mlp.linear_fc1.{p}",
                    (h + f"mlp.gate_proj.{p}", h + f"mlp.up_proj.{p}"),
                    "glu",
                )
            )
            rules.append(Rule(m + f"mlp.linear_fc2.{p}", (h + f"mlp.down_proj.{p}",)))
    return rules


def build_rules(spec: QwenVLSpec) -> list[Rule]:
    """Every tensor of the model, in HF order (vision, embeddings, layers, norm, head)."""
    rules = [Rule("vision.patch_embed.proj.weight", ("visual.patch_embed.proj.weight",))]
    for i in range(spec.vision_depth):
        rules += _vision_block_rules(spec, i)
    norm_params = ("weight", "bias") if spec.arch == "qwen2_vl" else ("weight",)
    rules += [Rule(f"vision.merger.ln_q.{p}", (f"visual.merger.ln_q.{p}",)) for p in norm_params]
    for p in ("weight", "bias"):
        rules.append(Rule(f"vision.merger.mlp.linear_fc1.{p}", (f"visual.merger.mlp.0.{p}",)))
        rules.append(Rule(f"vision.merger.mlp.linear_fc2.{p}", (f"visual.merger.mlp.2.{p}",)))
    rules.append(
        Rule("language_model.embedding.word_embeddings.weight", ("model.embed_tokens.weight",))
    )
    for i in range(spec.num_layers):
        rules += _lm_layer_rules(i)
    rules.append(Rule("language_model.decoder.final_layernorm.weight", ("model.norm.weight",)))
    # A tied output layer is the embedding (HF then writes no lm_head).
    head = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
    rules.append(Rule("language_model.output_layer.weight", (head,)))
    return rules


def normalize_hf_name(name: str) -> str:
    """transformers 5.x in-memory names -> the names checkpoints on disk use."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def canonical_mcore_name(param_name: str, lm_layer_offset: int = 0) -> str:
    """A parameter name of this rank's model -> its rule name (TE norm names, global layer)."""
    for local, te in LOCAL_TO_TE_KEYS.items():
        param_name = param_name.replace(local, te)
    if param_name.startswith(LM_LAYER_PREFIX) and lm_layer_offset:
        index, rest = param_name[len(LM_LAYER_PREFIX) :].split(".", 1)
        param_name = f"{LM_LAYER_PREFIX}{int(index) + lm_layer_offset}.{rest}"
    return param_name


# ---- transforms on full tensors -------------------------------------------------------------


def _heads(spec: QwenVLSpec, rule: Rule) -> tuple[int, int, int]:
    """(query heads, query groups, head dim) of the attention a QKV rule belongs to."""
    if rule.kind == "packed_qkv":
        return spec.vision_num_heads, spec.vision_num_heads, spec.vision_head_dim
    return spec.num_heads, spec.num_kv_heads, spec.head_dim


def _fuse_qkv(q, k, v, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    rest = q.shape[1:]
    per_group = [
        q.reshape(groups, heads // groups * head_dim, *rest),
        k.reshape(groups, head_dim, *rest),
        v.reshape(groups, head_dim, *rest),
    ]
    return torch.cat(per_group, dim=1).reshape(-1, *rest)


def _split_qkv(fused, heads: int, groups: int, head_dim: int) -> list[torch.Tensor]:
    rest = fused.shape[1:]
    q_size = heads // groups * head_dim
    grouped = fused.reshape(groups, q_size + 2 * head_dim, *rest)
    q, k, v = grouped.split([q_size, head_dim, head_dim], dim=1)
    return [x.reshape(-1, *rest).contiguous() for x in (q, k, v)]


def hf_to_mcore(rule: Rule, hf_tensors: list[torch.Tensor], spec: QwenVLSpec) -> torch.Tensor:
    """HF tensor(s) -> the full Megatron tensor of ``rule``."""
    if rule.kind == "copy":
        return hf_tensors[0]
    if rule.kind == "glu":
        return torch.cat(hf_tensors, dim=0)
    heads, groups, head_dim = _heads(spec, rule)
    qkv = hf_tensors if rule.kind == "qkv" else hf_tensors[0].chunk(3, dim=0)
    return _fuse_qkv(*qkv, heads, groups, head_dim)


def mcore_to_hf(rule: Rule, tensor: torch.Tensor, spec: QwenVLSpec) -> list[torch.Tensor]:
    """The full Megatron tensor of ``rule`` -> its HF tensor(s), in ``rule.hf`` order."""
    if rule.kind == "copy":
        return [tensor]
    if rule.kind == "glu":
        return [x.contiguous() for x in tensor.chunk(2, dim=0)]
    qkv = _split_qkv(tensor, *_heads(spec, rule))
    return qkv if rule.kind == "qkv" else [torch.cat(qkv, dim=0)]


def shard_for_rank(
    rule: Rule, full: torch.Tensor, local_shape: torch.Size, tp_rank: int, tp_size: int
) -> torch.Tensor:
    """The slice of ``full`` that a tensor-parallel rank holds (its parameter has local_shape)."""
    if tuple(full.shape) == tuple(local_shape):
        return full
    dims = [d for d, (a, b) in enumerate(zip(full.shape, local_shape)) if a != b]
    if len(dims) != 1 or full.shape[dims[0]] != local_shape[dims[0]] * tp_size:
        raise ValueError(
            f"{rule.mcore}: cannot shard {tuple(full.shape)} into {tuple(local_shape)} "
            f"over {tp_size} tensor-parallel ranks"
        )
    dim = dims[0]
    if rule.kind == "glu":
        return torch.cat([half.chunk(tp_size, dim)[tp_rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(tp_size, dim)[tp_rank]
