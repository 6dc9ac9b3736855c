"""The Qwen2-VL / Qwen2.5-VL vision tower as Megatron-Core modules.

Pixels arrive as the HF processor packs them: ``pixel_values`` [N, C*T*P*P], one row per
(temporal patch x spatial patch), items (images, videos) concatenated, and within each 2x2
merge block the four patches adjacent; ``grid_thw`` [n_items, 3] gives each item's grid in
patches. The tower embeds patches with a 3D convolution, applies 2D rotary embeddings (h and w),
runs Megatron transformer layers over the whole packed sequence with attention confined to each
frame (Qwen2-VL, Qwen2.5-VL full-attention blocks) or each window of merged patches (the other
Qwen2.5-VL blocks), and merges every 2x2 block into one LM-sized token.

Shape legend: N patches, U = N / merge**2 merged units, D vision width, H LM width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.utils import sharded_state_dict_default

from megatron_vcap.models import specs
from megatron_vcap.models.hf_config import QwenVLSpec
from megatron_vcap.models.megatron_config import MegatronConfigs


def compute_frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Segment boundaries of one segment per frame (temporal patch) of each item: [n_frames+1]."""
    per_frame = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return torch.cat([per_frame.new_zeros(1), per_frame.cumsum(0)]).to(torch.int32)


def compute_patch_hw(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, column) of every patch in the processor's merge-block order: [N, 2]."""
    out = []
    for t, h, w in grid_thw.tolist():
        bh, bw = h // merge, w // merge
        rows = torch.arange(h).view(bh, 1, merge, 1).expand(bh, bw, merge, merge)
        cols = torch.arange(w).view(1, bw, 1, merge).expand(bh, bw, merge, merge)
        out.append(torch.stack([rows.flatten(), cols.flatten()], dim=-1).repeat(t, 1))
    return torch.cat(out)


def compute_window_index(
    grid_thw: torch.Tensor, merge: int, window_units: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL window order of the merged units and the windows' boundaries in patches.

    Windows are ``window_units`` x ``window_units`` merged units, tiled row-major over each frame
    (edge windows are smaller). Returns ``window_index`` [U] (the unit at each new position) and
    ``cu_window_seqlens`` [n_windows+1] (cumulative patch counts, int32).
    """
    order, lengths, base = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        nh, nw = -(-gh // window_units), -(-gw // window_units)
        units = torch.full((t, nh * window_units, nw * window_units), -1, dtype=torch.long)
        units[:, :gh, :gw] = torch.arange(t * gh * gw).view(t, gh, gw) + base
        windows = (
            units.view(t, nh, window_units, nw, window_units)
            .permute(0, 1, 3, 2, 4)
            .reshape(t * nh * nw, window_units * window_units)
        )
        valid = windows >= 0
        order.append(windows[valid])
        lengths.append(valid.sum(-1))
        base += t * gh * gw
    counts = torch.cat(lengths) * merge * merge
    cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return torch.cat(order), cu


class VisionRotaryEmbedding(nn.Module):
    """2D rotary frequencies: half the rotary channels follow the row, half the column."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        half = head_dim // 2
        # A plain attribute, not a buffer: casting the model to bf16 must not round it.
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))

    def forward(self, patch_hw: torch.Tensor) -> torch.Tensor:
        """[N, 2] positions -> [N, 1, 1, head_dim] angles in Megatron's rotary layout."""
        freqs = patch_hw.float()[..., None] * self.inv_freq
        freqs = freqs.flatten(1)  # [N, head_dim/2]: row angles then column angles
        return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]


def _packed(cu_seqlens: torch.Tensor, device) -> PackedSeqParams:
    cu = cu_seqlens.to(device)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


class PatchMerger(MegatronModule):
    """Norm each patch, concatenate each 2x2 block, project to the LM width: [N, D] -> [U, H]."""

    def __init__(self, configs: MegatronConfigs, spec: QwenVLSpec, use_te: bool):
        super().__init__(config=configs.merger)
        norm = specs.build_norm_module(use_te, rms_norm=spec.arch == "qwen2_5_vl")
        self.ln_q = build_module(
            norm, config=configs.vision, hidden_size=spec.vision_hidden_size, eps=1e-6
        )
        self.mlp = MLP(
            config=configs.merger,
            submodules=specs.build_mlp_submodules(use_te),
            input_size=spec.merger_hidden_size,
            ffn_hidden_size=spec.merger_hidden_size,
        )
        self.merged_size = spec.merger_hidden_size

    def forward(self, hidden_ND: torch.Tensor) -> torch.Tensor:
        merged = self.ln_q(hidden_ND).reshape(-1, 1, self.merged_size)
        out, bias = self.mlp(merged)
        if bias is not None:
            out = out + bias
        return out.squeeze(1)


class QwenVisionModel(MegatronModule):
    """Patch embedding, rotary, transformer blocks and merger of the Qwen-VL vision tower."""

    def __init__(self, configs: MegatronConfigs, spec: QwenVLSpec, use_te: bool):
        super().__init__(config=configs.vision)
        self.spec = spec
        kernel = (spec.temporal_patch_size, spec.patch_size, spec.patch_size)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(
            spec.in_channels,
            spec.vision_hidden_size,
            kernel_size=kernel,
            stride=kernel,
            bias=False,
            dtype=configs.vision.params_dtype,
        )
        self.rotary = VisionRotaryEmbedding(spec.vision_head_dim, spec.vision_rope_theta)
        layer_spec = specs.build_layer_spec(
            use_te,
            rms_norm=spec.arch == "qwen2_5_vl",
            vision=True,
            fp32=configs.vision.params_dtype == torch.float32,
        )
        self.blocks = nn.ModuleList(
            build_module(layer_spec, config=configs.vision, layer_number=i + 1)
            for i in range(spec.vision_depth)
        )
        self.merger = PatchMerger(configs, spec, use_te)
        # Packed rows are padded to a multiple of this (16 merged tokens) for FP8 GEMMs.
        self.pad_multiple = 16 * spec.spatial_merge_size**2 if configs.vision.fp8 else 1

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """[N, C*T*P*P] pixels, [n_items, 3] grids -> [U, H] merged tokens in input order."""
        from megatron.core.fp8_utils import get_fp8_context

        spec = self.spec
        unit = spec.spatial_merge_size**2
        grid_thw = grid_thw.cpu()
        weight = self.patch_embed.proj.weight
        # Loaders and prompt builders keep pixels on the host; the tower may live on a GPU.
        patches = pixel_values.to(weight.device, weight.dtype).view(
            -1, spec.in_channels, spec.temporal_patch_size, spec.patch_size, spec.patch_size
        )
        hidden = self.patch_embed.proj(patches).view(-1, spec.vision_hidden_size)
        rotary = self.rotary(compute_patch_hw(grid_thw, spec.spatial_merge_size))
        rotary = rotary.to(hidden.device)
        segments = {"frames": compute_frame_cu_seqlens(grid_thw)}
        window_index = None
        if spec.uses_window_attention:
            window_units = spec.window_size // spec.spatial_merge_size // spec.patch_size
            window_index, segments["windows"] = compute_window_index(
                grid_thw, spec.spatial_merge_size, window_units
            )
            hidden = _permute_units(hidden, window_index, unit)
            rotary = _permute_units(rotary, window_index, unit)
        num_patches = hidden.shape[0]
        pad = (-num_patches) % self.pad_multiple
        if pad:  # FP8 GEMMs need row counts divisible by 16: pad rows form their own segment
            hidden = torch.cat([hidden, hidden.new_zeros(pad, hidden.shape[1])])
            rotary = torch.cat([rotary, rotary.new_zeros(pad, *rotary.shape[1:])])
            end = torch.tensor([num_patches + pad], dtype=torch.int32)
            segments = {k: torch.cat([cu, end]) for k, cu in segments.items()}
        packed = {k: _packed(cu, hidden.device) for k, cu in segments.items()}
        hidden = hidden.unsqueeze(1)  # [N, 1, D]: Megatron's [s, b, h] with one packed row
        with get_fp8_context(self.config):
            for i, block in enumerate(self.blocks):
                full = window_index is None or i in spec.fullatt_block_indexes
                hidden = self._run_block(
                    block, hidden, rotary, packed["frames" if full else "windows"]
                )
            merged = self.merger(hidden.squeeze(1))[: num_patches // unit]
        if window_index is not None:
            merged = merged[torch.argsort(window_index.to(merged.device))]
        return merged

    def _run_block(self, block, hidden, rotary, packed):
        def run(x):
            return block(
                hidden_states=x,
                attention_mask=None,
                rotary_pos_emb=rotary,
                packed_seq_params=packed,
            )[0]

        if self.config.recompute_granularity == "full" and self.training:
            from megatron.core import tensor_parallel

            return tensor_parallel.checkpoint(run, False, hidden)
        return run(hidden)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        # The blocks sit in a plain ModuleList, whose default handling would treat their
        # tensor-parallel weights as replicated; give each layer its own key prefix instead.
        from megatron.core import parallel_state

        # Replicated tensors need the TP group to mark all but one rank's copy as replicas.
        tp_group = parallel_state.get_tensor_model_parallel_group()
        out = {}
        for name, module in self.named_children():
            if name == "blocks":
                for i, layer in enumerate(module):
                    out.update(
                        layer.sharded_state_dict(f"{prefix}blocks.{i}.", sharded_offsets, metadata)
                    )
            else:
                out.update(
                    sharded_state_dict_default(
                        module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=tp_group
                    )
                )
        return out


def _permute_units(x: torch.Tensor, unit_index: torch.Tensor, unit: int) -> torch.Tensor:
    """Reorder rows of x [N, ...] in blocks of ``unit`` rows by ``unit_index`` [N / unit]."""
    blocks = x.reshape(x.shape[0] // unit, unit, *x.shape[1:])
    return blocks[unit_index.to(x.device)].reshape(x.shape)
