"""``video_index``: rows sharing a video encode it once, with the same logits and gradients.

The oracle is the same model given the video's patches once per row (each row encodes it).
"""

from __future__ import annotations

import torch


def _rows(hf_config, grids: list[tuple[int, int, int]], uses: list[int], text_len: int = 5):
    """Token rows, each holding the video ``uses[r]``'s pads between random text."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for r, v in enumerate(uses):
        n = grids[v][0] * grids[v][1] * grids[v][2] // 4
        text = torch.randint(0, 90, (text_len + r,), generator=gen)
        rows.append(torch.cat([text, torch.full((n,), hf_config.video_token_id), text[:3]]))
    width = max(len(x) for x in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for r, x in enumerate(rows):
        ids[r, : len(x)] = x
    return ids


def test_video_index_matches_per_row_encoding(single_rank):
    from megatron_vcap.models.config import ModelConfig
    from megatron_vcap.models.mrope import compute_mrope_position_ids
    from megatron_vcap.models.presets import tiny_hf_config
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model

    hf_config = tiny_hf_config("qwen2_5_vl", vocab_size=128)
    model = build_qwen_vl_model(
        hf_config, ModelConfig(params_dtype="fp32", transformer_impl="local")
    )
    grids = [(2, 4, 4), (2, 4, 6)]
    patch_dim = 3 * 2 * 14 * 14
    gen = torch.Generator().manual_seed(1)
    pixels = [torch.randn(t * h * w, patch_dim, generator=gen) for t, h, w in grids]
    uses = [0, 0, 1, 0, 1]  # rows -> video
    ids = _rows(hf_config, grids, uses)
    grid_rows = torch.tensor([grids[v] for v in uses])
    positions, _ = compute_mrope_position_ids(
        ids, video_grid_thw=grid_rows, second_per_grid_ts=torch.ones(len(uses)), hf_config=hf_config
    )

    def run(**vision):
        model.zero_grad(set_to_none=True)
        logits = model(ids, positions, None, runtime_gather_output=True, **vision)
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    per_row, grads_row = run(
        pixel_values_videos=torch.cat([pixels[v] for v in uses]), video_grid_thw=grid_rows
    )
    shared, grads_shared = run(
        pixel_values_videos=torch.cat(pixels),
        video_grid_thw=torch.tensor(grids),
        video_index=torch.tensor(uses),
    )
    assert torch.allclose(per_row, shared, atol=1e-5, rtol=0)
    assert any(n.startswith("vision.") for n in grads_row)
    assert set(grads_row) == set(grads_shared)
    for name, g in grads_row.items():
        assert torch.allclose(g, grads_shared[name], atol=1e-5, rtol=1e-4), name
