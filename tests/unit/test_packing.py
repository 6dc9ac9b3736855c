"""Packed (THD) training passes equal padded ones: loss, metrics and every gradient to 1e-5.

A tiny Qwen2.5-VL (vision tower included) takes two video prompts with G = 3 responses of very
different lengths; the GRPO loss (with KL to reference log-probs), its metrics and the gradients
of all parameters are computed once on right-padded micro-batches and once with each
micro-batch packed into one sequence (CPU: block-diagonal causal SDPA). mRoPE positions come from
each prompt (video positions, rope delta) and must survive packing as they are: recomputing them
over the packed row is shown to change the loss.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_vcap.rl.packing import computed_tokens, pack_rows, unpack_BT

VID = "<|vision_start|><|video_pad|><|vision_end|>"
GROUP = 3


def test_pack_rows_by_hand():
    tokens = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    pos = torch.stack([tokens * 10, tokens * 100, tokens * 1000])
    packed = pack_rows(tokens, pos, torch.tensor([3, 2, 4]), multiple=4)
    assert packed.tokens_1N.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4, 0, 0, 0]]
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 9, 12]  # the tail pad is its own segment
    assert packed.max_seqlen == 4
    # Each row keeps its own positions (here 100 x token on the h axis).
    assert packed.position_ids_31N[1, 0, :9].tolist() == [
        500,
        600,
        700,
        800,
        900,
        100,
        200,
        300,
        400,
    ]
    values = torch.arange(12, dtype=torch.float32)[None] + 1
    # Column 0 of each row and the padding stay 0.
    assert unpack_BT(values, packed).tolist() == [
        [0, 2, 3, 0],
        [0, 5, 0, 0],
        [0, 7, 8, 9],
    ]
    assert computed_tokens(torch.tensor([3, 2, 4]), 4, packed=True) == 9
    assert computed_tokens(torch.tensor([3, 2, 4]), 4, packed=False) == 12
    with pytest.raises(ValueError, match="seq_len_B"):
        pack_rows(tokens, pos, torch.tensor([3, 0, 4]))


@pytest.fixture(scope="module")
def vl_setup(single_rank):
    from megatron_vcap.data.tokens import special_token_ids
    from megatron_vcap.models.config import ModelConfig
    from megatron_vcap.models.mrope import compute_mrope_position_ids
    from megatron_vcap.models.presets import (
        build_tiny_inputs,
        build_tiny_processor,
        synthetic_frames,
        tiny_hf_config,
    )
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model
    from megatron_vcap.rl.records import Rollout, build_train_batch
    from megatron_vcap.rollout.types import PromptSpec

    hf_config = tiny_hf_config("qwen2_5_vl")
    processor = build_tiny_processor(hf_config)
    torch.manual_seed(0)
    model = build_qwen_vl_model(
        hf_config, ModelConfig(params_dtype="fp32", transformer_impl="local")
    )
    prompts = []
    for i, (frames, fps, text) in enumerate(
        [(6, 2.0, f"clip {VID} describe it"), (4, 1.0, f"{VID} short")]
    ):
        inputs = build_tiny_inputs(
            processor,
            [text],
            videos=[synthetic_frames(frames, 56, 84, seed=i)],
            video_fps=[fps],
        )
        pos, delta = compute_mrope_position_ids(
            inputs["input_ids"],
            video_grid_thw=inputs["video_grid_thw"],
            second_per_grid_ts=inputs["second_per_grid_ts"],
            hf_config=hf_config,
        )
        vision = {k: inputs[k] for k in ("pixel_values_videos", "video_grid_thw")}
        prompts.append(PromptSpec(inputs["input_ids"][0], pos[:, 0], int(delta[0]), vision))
    g = torch.Generator().manual_seed(3)
    first_special = min(special_token_ids(processor.tokenizer).values())
    rollouts = []
    for p in range(2):
        for s, length in enumerate((2, 17, 6) if p == 0 else (30, 1, 9)):
            out = SimpleNamespace(
                prompt_index=p,
                sample_index=s,
                response_ids_R=torch.randint(0, first_special, (length,), generator=g),
                finish_reason="eos",
                logprobs_R=None,
            )
            rollouts.append(Rollout.from_generation(out, prompts[p], f"{p}/{s}"))
    batch = build_train_batch(rollouts, prompts, torch.randn(len(rollouts), generator=g))
    # Reference log-probs: a perturbed copy of the policy log-probs stands in (KL is non-zero).
    batch.ref_logp_BT = -torch.rand(batch.tokens_BT.shape, generator=g)
    batch.loss_mask_BT[4] = 0.0  # an invalid rollout (e.g. failed judge)
    return model, batch


def _grpo_pass(model, batch, *, pack: bool, micro_batch_size: int = 4):
    from megatron_vcap.rl.engine import (
        GRPO_STEP_REDUCTIONS,
        grpo_loss_fn,
        reduce_microbatch_metrics,
        run_microbatches,
    )

    cfg = SimpleNamespace(
        clip_eps_low=0.2,
        clip_eps_high=0.2,
        kl_beta=0.1,
        kl_estimator="k3",
        loss_aggregation="token_mean",
        tis_cap=None,
    )
    model.zero_grad(set_to_none=True)
    model.train()
    loss_fn = grpo_loss_fn(
        cfg,
        tp_group=None,
        temperature=0.9,
        normaliser=float(batch.loss_mask_BT.sum()),
        undo_averaging=1,
    )
    mbs = batch.micro_batches(micro_batch_size)
    outs = run_microbatches(model, mbs, loss_fn, forward_only=False, pack=pack)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return reduce_microbatch_metrics(outs, GRPO_STEP_REDUCTIONS), grads


def _logprob_pass(model, batch, *, pack: bool):
    from megatron_vcap.rl.engine import logprob_loss_fn, run_microbatches

    loss_fn = logprob_loss_fn(tp_group=None, temperature=1.0, key="logp")
    mbs = batch.micro_batches(4)
    with torch.no_grad():
        outs = run_microbatches(model, mbs, loss_fn, forward_only=True, pack=pack)
    return [o["logp"] for o in outs]


def test_packed_equals_padded_loss_and_gradients(vl_setup):
    model, batch = vl_setup
    padded, grads_padded = _grpo_pass(model, batch, pack=False)
    packed, grads_packed = _grpo_pass(model, batch, pack=True)
    assert padded["loss"] != 0 and padded["kl_mean"] > 0
    for key, value in padded.items():
        assert abs(packed[key] - value) <= 1e-5 * max(1.0, abs(value)), (key, value, packed[key])
    assert set(grads_padded) == set(grads_packed)
    assert any(n.startswith("vision.") for n in grads_padded)  # the vision tower is trained too
    for name, g in grads_padded.items():
        assert float(g.abs().max()) > 0 or "bias" in name
        torch.testing.assert_close(grads_packed[name], g, atol=1e-5, rtol=1e-5, msg=name)
    padded_logp = _logprob_pass(model, batch, pack=False)
    packed_logp = _logprob_pass(model, batch, pack=True)
    for mb, a, b in zip(batch.micro_batches(4), padded_logp, packed_logp):
        # Equal on every real token; padding columns are 0 when packed (never computed).
        real_BT = torch.arange(a.shape[1])[None, :] < mb.seq_len_B[:, None]
        torch.testing.assert_close(a * real_BT, b, atol=1e-5, rtol=1e-5)


def test_positions_recomputed_over_the_packed_row_would_differ(vl_setup):
    """The known bug: mRoPE ids over the packed row (continuing across rows) change the result."""
    model, batch = vl_setup
    mb = batch.micro_batches(4)[0]
    packed = pack_rows(mb.tokens_BT, mb.position_ids_3BT, mb.seq_len_B)
    from megatron_vcap.rl.engine import model_vision_kwargs

    model.eval()
    with torch.no_grad():
        right = model(
            packed.tokens_1N,
            packed.position_ids_31N,
            None,
            packed_seq_params=packed.params,
            **model_vision_kwargs(mb),
        )
        n = packed.tokens_1N.shape[1]
        wrong = model(
            packed.tokens_1N,
            torch.arange(n).expand(3, 1, -1),
            None,
            packed_seq_params=packed.params,
            **model_vision_kwargs(mb),
        )
        row0 = int(mb.seq_len_B[0])
        padded = model(mb.tokens_BT, mb.position_ids_3BT, None, **model_vision_kwargs(mb))
    torch.testing.assert_close(right[0, :row0], padded[0, :row0], atol=1e-5, rtol=1e-5)
    # A tiny random model is weakly position-sensitive; still 100x the packing tolerance.
    assert float((wrong[0, row0:] - right[0, row0:]).abs().max()) > 1e-3
