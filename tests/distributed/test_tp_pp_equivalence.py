"""Megatron-Core GPTModel on CPU/gloo: loss and gradients at TP=2, PP=2 and TP=2 x PP=2 equal TP=1.

One 4-rank run re-initialises the model-parallel groups for each layout in turn, loads the same
full weights (sharded by hand from the TP=1 model), runs Megatron's own forward-backward schedule
and gathers the gradients back to full shape. The TP=1 layout is the oracle.
"""

from __future__ import annotations

import pytest
import torch

from megatron_vcap.parallel.multiprocess import run_on_ranks

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (tp, pp)
NUM_LAYERS, HIDDEN, HEADS, GROUPS, VOCAB, SEQ, BATCH, MICRO = 4, 32, 4, 2, 64, 12, 4, 2


def _build_model(tp: int, pp: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=NUM_LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        ffn_hidden_size=4 * HIDDEN,
        add_qkv_bias=True,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )
    from megatron.core import parallel_state as ps

    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )


def _global_name(name: str, pp_rank: int, pp: int) -> str:
    if name.startswith("decoder.layers."):
        parts = name.split(".")
        parts[2] = str(int(parts[2]) + pp_rank * NUM_LAYERS // pp)
        return ".".join(parts)
    return name


def _run_layout(tp, pp, full_weights, tokens, labels):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vcap.parallel.config import ParallelConfig
    from megatron_vcap.parallel.runtime import init_distributed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ctx = init_distributed(
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=7
    )
    model = _build_model(tp, pp)
    if full_weights is None:  # the oracle layout: its weights become everyone's weights
        full_weights = {
            _global_name(k, 0, 1): v.detach().clone()
            for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")
        }
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            full = full_weights[_global_name(name, ctx.pp_rank, pp)]
            if getattr(param, "tensor_model_parallel", False):
                full = full.chunk(tp, dim=param.partition_dim)[ctx.tp_rank]
            param.copy_(full)

    def forward_step(data_iterator, model):
        tok, lab = next(data_iterator)
        pos = torch.arange(SEQ).unsqueeze(0).expand_as(tok)
        out = model(tok, pos, None, labels=lab)

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    micro = [(tokens[i : i + MICRO], labels[i : i + MICRO]) for i in range(0, BATCH, MICRO)]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=[model],
        num_microbatches=len(micro),
        seq_length=SEQ,
        micro_batch_size=MICRO,
        forward_only=False,
    )
    loss = None
    if ctx.is_last_stage:
        loss = sum(float(x["loss"]) for x in losses) / len(losses)
    grads = {}
    for name, param in params.items():
        grad = param.main_grad if hasattr(param, "main_grad") else param.grad
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(grad) for _ in range(tp)]
            torch.distributed.all_gather(parts, grad.contiguous(), group=ctx.tp_group)
            grad = torch.cat(parts, dim=param.partition_dim)
        grads[_global_name(name, ctx.pp_rank, pp)] = grad.detach().clone()
    # Assemble the whole model's gradients on every rank from the pipeline stages.
    gathered = [None] * pp
    torch.distributed.all_gather_object(gathered, (loss, grads), group=ctx.pp_group)
    loss = next(v[0] for v in gathered if v[0] is not None)
    all_grads = {}
    for _, g in gathered:
        all_grads.update(g)
    return full_weights, loss, all_grads


def _check_all_layouts():
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    results = {}
    weights = None
    for tp, pp in LAYOUTS:
        weights, loss, grads = _run_layout(tp, pp, weights, tokens, labels)
        results[(tp, pp)] = (loss, grads)
    return {k: (v[0], {n: g.numpy() for n, g in v[1].items()}) for k, v in results.items()}


@pytest.mark.timeout(900)
def test_tp_pp_match_tp1():
    per_rank = run_on_ranks(_check_all_layouts, 4)
    ref_loss, ref_grads = per_rank[0][(1, 1)]
    assert ref_loss > 0 and len(ref_grads) > 10
    for rank, results in enumerate(per_rank):
        for layout, (loss, grads) in results.items():
            assert abs(loss - ref_loss) < 1e-5, (rank, layout, loss, ref_loss)
            assert set(grads) == set(ref_grads), (rank, layout)
            for name, grad in grads.items():
                diff = abs(grad - ref_grads[name]).max()
                assert diff < 1e-5, f"rank {rank} layout tp,pp={layout} {name}: max diff {diff}"
                # A zero gradient everywhere would make the comparison vacuous.
            assert max(abs(g).max() for g in grads.values()) > 1e-4
