"""Batched, KV-cached sampling of G responses per prompt on a Megatron model.

Phases (one ``generate`` call):

1. **Layout.** Each of the P x G rows gets its prompt placed in a [rows, columns] token buffer
   and a [3, rows, columns] mRoPE position buffer. Two layouts (``kv_layout``):
   ``left_pad`` right-aligns prompts so every row starts generating at the same column and masks
   the pad columns out of attention (needs an attention that honours ``attention_mask`` while
   decoding: Megatron's local ``DotProductAttention``); ``aligned`` left-aligns them and, while a
   longer prompt is still being read, feeds its prompt tokens as decode steps (teacher forcing),
   which needs no mask at all (Transformer Engine's attention ignores the mask when decoding).
   ``auto`` picks ``aligned`` when the model uses TE attention and ``left_pad`` otherwise.
2. **Prefill.** With ``share_prefix``, each prompt runs once (batch 1; the only model call that
   sees the vision inputs) in a scratch context, and its keys/values are copied to its G rows;
   without, each row is prefilled on its own copy of the prompt (the baseline for benchmarks).
3. **Decode.** One token per live row per step, positions of the whole sequence so far passed
   in (Megatron slices the rotary table by absolute column), decode positions continuing as
   ``s + rope_delta``. Finished rows are dropped from the batch (cache compaction).

Tokens are chosen on the first rank of the tensor-parallel group and broadcast, so every TP rank
holds identical responses. Pipeline-parallel models generate through ``rollout/pipeline.py``
(same layout, cache and stopping; micro-batches pipelined over the stages); context parallel
generation is not supported.

Shape legend: P = prompts, G = samples per prompt, B = rows (P x G, or the live subset),
C = cache columns, S = prompt tokens, V = vocabulary.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_vcap.config.loader import ConfigError
from megatron_vcap.parallel.cpu_compat import device_redirect_suspended
from megatron_vcap.rollout.kv_cache import SlotKVCache, new_prefill_context
from megatron_vcap.rollout.sampling import (
    SamplingParams,
    anchor_rows,
    chosen_token_logprobs,
    sample_tokens,
)
from megatron_vcap.rollout.stopping import DecodeFn, StopChecker
from megatron_vcap.rollout.types import GenerationOutput, PromptSpec

KV_LAYOUTS = ("auto", "left_pad", "aligned")


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "config"):
        model = model.module
    return model


def uses_te_attention(model) -> bool:
    """Whether any attention core is Transformer Engine's (which ignores masks when decoding)."""
    return any(type(m).__name__.startswith("TE") and "Attention" in type(m).__name__
               for m in model.modules())  # fmt: skip


def resolve_kv_layout(model, kv_layout: str) -> str:
    if kv_layout not in KV_LAYOUTS:
        raise ConfigError(f"kv_layout: expected one of {list(KV_LAYOUTS)}, got {kv_layout!r}")
    if kv_layout == "auto":
        return "aligned" if uses_te_attention(model) else "left_pad"
    if kv_layout == "left_pad" and uses_te_attention(model):
        raise ConfigError("kv_layout: 'left_pad' needs masked decode attention; TE ignores it")
    return kv_layout


def check_generation_parallelism(
    model, tp_group: dist.ProcessGroup | None, pp_group: dist.ProcessGroup | None = None
) -> None:
    """Reject layouts generation does not support, with a message that says what to change."""
    config = getattr(_unwrap(model), "config", None)
    if config is None:
        return
    pp = getattr(config, "pipeline_model_parallel_size", 1)
    if pp > 1 and (pp_group is None or dist.get_world_size(pp_group) != pp):
        raise ConfigError(f"generate: the model is split over PP={pp}; pass its pp_group")
    if getattr(config, "context_parallel_size", 1) > 1:
        raise ConfigError("parallel.context_parallel_size: rollout generation needs 1")
    if getattr(config, "sequence_parallel", False):
        raise ConfigError(
            "parallel.sequence_parallel: one-token decode steps cannot be split over the sequence;"
            " generate with a model built without sequence parallelism"
        )
    tp = getattr(config, "tensor_model_parallel_size", 1)
    if tp > 1 and (tp_group is None or dist.get_world_size(tp_group) != tp):
        raise ConfigError(f"generate: the model is split over TP={tp}; pass its tp_group")


@dataclass
class _Layout:
    """Where every row's tokens live in the cache and where its generation begins."""

    shift_B: torch.Tensor  # column of the row's first prompt token
    gen_start_B: torch.Tensor  # column of the row's first generated token
    tokens_BC: torch.Tensor
    positions_3BC: torch.Tensor
    pad_BC: torch.Tensor | None  # True on columns that hold no token of the row
    first_decode_column: int


def _build_layout(prompts, group_size, max_new_tokens, kv_layout, device) -> _Layout:
    lengths = [p.length for p in prompts]
    longest = max(lengths)
    capacity = longest + max_new_tokens
    rows = len(prompts) * group_size
    tokens_BC = torch.zeros(rows, capacity, dtype=torch.long)
    positions_3BC = torch.zeros(3, rows, capacity, dtype=torch.long)
    pad_BC = torch.zeros(rows, capacity, dtype=torch.bool)
    shift_B = torch.zeros(rows, dtype=torch.long)
    for p, prompt in enumerate(prompts):
        shift = longest - prompt.length if kv_layout == "left_pad" else 0
        row = slice(p * group_size, (p + 1) * group_size)
        end = shift + prompt.length
        tokens_BC[row, shift:end] = prompt.input_ids_S.cpu()
        positions_3BC[:, row, shift:end] = prompt.position_ids_3S.cpu()[:, None, :]
        positions_3BC[:, row, end:] = prompt.response_position_ids_3R(capacity - end)[:, None, :]
        pad_BC[row, :shift] = True
        shift_B[row] = shift
    gen_start_B = shift_B + torch.tensor(lengths).repeat_interleave(group_size)
    return _Layout(
        shift_B=shift_B.to(device),
        gen_start_B=gen_start_B.to(device),
        tokens_BC=tokens_BC.to(device),
        positions_3BC=positions_3BC.to(device),
        pad_BC=pad_BC.to(device) if bool(pad_BC.any()) else None,
        first_decode_column=int(gen_start_B.min()),
    )


def _call_model(model, tokens_BS, positions_3BS, mask, context, extra):
    out = model(
        tokens_BS,
        positions_3BS,
        mask,
        inference_context=context,
        runtime_gather_output=True,
        **extra,
    )
    return out[:, -1].float()


def _prefill(model, prompts, layout, cache, group_size, share_prefix) -> torch.Tensor:
    """Prefill every row's prompt into ``cache``; returns the last-position logits_BV."""
    device = layout.tokens_BC.device
    logits_rows = [None] * (len(prompts) * group_size)
    for p, prompt in enumerate(prompts):
        rows = list(range(p * group_size, (p + 1) * group_size))
        if share_prefix:
            chunks = [(rows, 1)]  # one pass, broadcast to the group
        elif prompt.vision_kwargs:
            chunks = [([r], 1) for r in rows]  # vision inputs are per call: one copy per call
        else:
            chunks = [(rows, group_size)]  # G copies in one batch
        ids_1S = prompt.input_ids_S.to(device)[None]
        pos_31S = prompt.position_ids_3S.to(device)[:, None]
        for target_rows, batch in chunks:
            context = new_prefill_context(batch, prompt.length)
            logits_bV = _call_model(
                model,
                ids_1S.expand(batch, -1),
                pos_31S.expand(-1, batch, -1),
                None,
                context,
                prompt.vision_kwargs,
            )
            source = torch.arange(batch).repeat_interleave(len(target_rows) // batch)
            target = torch.tensor(target_rows)
            cache.write_prefix(
                context, source, target, prompt.length, int(layout.shift_B[target_rows[0]])
            )
            for i, r in enumerate(target_rows):
                logits_rows[r] = logits_bV[int(source[i])]
            del context
    return torch.stack(logits_rows)


class _Decoder:
    """Per-row responses and the rows held in the cache batch, advanced one token per step.

    Finished rows stay in the batch (computed, ignored) until a quarter of it is finished; then
    the cache is compacted. Compacting on every finish would copy the whole cache up to B times.
    """

    def __init__(
        self, model, layout, cache, params, stopper, generator, tp_group, logprobs, group_size
    ):
        self.model, self.layout, self.cache = model, layout, cache
        self.params, self.stopper, self.generator = params, stopper, generator
        self.group_size = group_size
        self.tp_group, self.want_logprobs = tp_group, logprobs
        rows = layout.tokens_BC.size(0)
        device = layout.tokens_BC.device
        self.batch_B = torch.arange(rows, device=device)  # cache row i holds row batch_B[i]
        self.done_all = torch.zeros(rows, dtype=torch.bool, device=device)
        self.responses: list[list[int]] = [[] for _ in range(rows)]
        self.logprobs: list[list[float]] = [[] for _ in range(rows)]
        self.finish: list[str | None] = [None] * rows
        # Kept on the host so that a decode step needs no device reads to know that every row
        # of the batch is generating and none has finished (the common case).
        self._done_in_batch = 0
        self._last_start = int(layout.gen_start_B.max())
        # One stage and one TP rank: a decode step only reads and writes the preallocated cache,
        # so the CPU device redirect (a Python call on every torch op) can step aside. TP's
        # gathers allocate on torch.cuda.current_device(), which needs the redirect.
        single = tp_group is None or dist.get_world_size(tp_group) == 1
        self._decode_scope = device_redirect_suspended if single else contextlib.nullcontext

    def _choose(self, rows_b: torch.Tensor, logits_bV: torch.Tensor) -> torch.Tensor:
        group = self.tp_group
        greedy_b = anchor_rows(rows_b, self.params, self.group_size)
        if group is None or dist.get_world_size(group) == 1:
            return sample_tokens(logits_bV, self.params, self.generator, greedy_b)
        src = dist.get_global_rank(group, 0)
        if dist.get_rank() == src:
            tokens_b = sample_tokens(logits_bV, self.params, self.generator, greedy_b)
        else:
            tokens_b = torch.empty(logits_bV.size(0), dtype=torch.long, device=logits_bV.device)
        dist.broadcast(tokens_b, src=src, group=group)
        return tokens_b

    def emit(self, rows_b: torch.Tensor, logits_bV: torch.Tensor) -> None:
        """Choose the next token of each of ``rows_b`` from its logits and record it."""
        if rows_b.numel() == 0:
            return
        tokens_b = self._choose(rows_b, logits_bV)
        rows = rows_b.tolist()
        lengths_b = torch.tensor([len(self.responses[r]) for r in rows], device=rows_b.device)
        self.layout.tokens_BC[rows_b, self.layout.gen_start_B[rows_b] + lengths_b] = tokens_b
        logp_b = None
        if self.want_logprobs:
            logp_b = chosen_token_logprobs(logits_bV, tokens_b, self.params).tolist()
        for i, (row, token) in enumerate(zip(rows, tokens_b.tolist())):
            self.responses[row].append(token)
            if logp_b is not None:
                self.logprobs[row].append(logp_b[i])
            self.finish[row] = self.stopper.check(self.responses[row])
            if self.finish[row] is not None:
                self.done_all[row] = True
                self._done_in_batch += 1

    @property
    def all_done(self) -> bool:
        return all(f is not None for f in self.finish)

    def compact(self, used_columns: int) -> None:
        num_done = self._done_in_batch
        if num_done == 0 or num_done < max(1, self.batch_B.numel() // 4):
            return
        keep_b = (~self.done_all[self.batch_B]).nonzero().flatten()
        self.batch_B = self.batch_B[keep_b]
        self._done_in_batch = 0
        if keep_b.numel():
            self.cache.keep_rows(keep_b, used_columns)

    def step(self, column: int) -> None:
        """Feed every batch row's token at ``column``; sample where the row is generating."""
        batch_B, layout = self.batch_B, self.layout
        mask = None
        if layout.pad_BC is not None:
            mask = layout.pad_BC[batch_B, : column + 1][:, None, None, :]
        logits_BV = _call_model(
            self.model,
            layout.tokens_BC[batch_B, column : column + 1],
            # This step's positions only: the cache holds rotated keys
            # (``RotaryCachedSelfAttention``), so no embedding of the earlier columns.
            layout.positions_3BC[:, batch_B, column : column + 1],
            mask,
            self.cache.context,
            {},
        )
        if self._done_in_batch == 0 and column >= self._last_start:
            self.emit(batch_B, logits_BV)
        else:
            # Rows still reading their prompt (aligned layout) only refresh their cache here.
            generating_B = (layout.gen_start_B[batch_B] <= column) & ~self.done_all[batch_B]
            self.emit(batch_B[generating_B], logits_BV[generating_B])
        self.compact(column + 1)
        self.cache.advance()

    def run(self, first_logits_BV: torch.Tensor) -> None:
        """Decode until every row is finished; each row's first token comes from its prefill."""
        layout = self.layout
        column = layout.first_decode_column
        # Aligned layout: rows of longer prompts take their first token when decoding reaches
        # the end of their prompt.
        pending_B = self.batch_B
        self.cache.start_decoding(column)
        # The whole loop (steps, token choice, compaction) allocates only on the devices of
        # existing tensors, so it runs without the CPU device redirect (see __init__).
        with self._decode_scope():
            while not self.all_done:
                if pending_B.numel():
                    starting_B = layout.gen_start_B[pending_B] == column
                    self.emit(pending_B[starting_B], first_logits_BV[pending_B[starting_B]])
                    pending_B = pending_B[~starting_B]
                self.compact(column)
                if self.all_done:
                    break
                self.step(column)
                column += 1


def generate(
    model,
    prompts: list[PromptSpec],
    *,
    sampling: SamplingParams,
    group_size: int = 1,
    decode_fn: DecodeFn | None = None,
    seed: int | None = None,
    share_prefix: bool = True,
    return_logprobs: bool = False,
    kv_layout: str = "auto",
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
    num_microbatches: int | None = None,
) -> list[GenerationOutput]:
    """Sample ``group_size`` responses for each prompt; outputs ordered by (prompt, sample).

    ``model(input_ids_BS, position_ids_3BS, attention_mask, *, inference_context,
    runtime_gather_output, **vision_kwargs)`` must return logits [B, S, V]. ``decode_fn`` turns
    token ids into text for ``sampling.stop_strings``. ``seed`` makes sampling reproducible
    (None draws one from torch's global RNG, identically on every rank). ``tp_group`` is the
    model's tensor-parallel group (tokens are chosen on its first rank and broadcast).
    ``pp_group`` (a model split over pipeline stages): generation runs through the stages in
    ``num_microbatches`` (default and minimum: the stage count) micro-batches
    (``rollout/pipeline.py``); every rank returns the same outputs.
    """
    if not prompts:
        return []
    if group_size < 1:
        raise ConfigError(f"group_size: must be >= 1, got {group_size}")
    check_generation_parallelism(model, tp_group, pp_group)
    layout_kind = resolve_kv_layout(model, kv_layout)
    stopper = StopChecker(sampling, decode_fn)
    device = next(model.parameters()).device
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    generator = torch.Generator(device=device).manual_seed(seed)

    was_training = model.training
    model.eval()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        from megatron_vcap.rollout.pipeline import generate_pipelined

        try:
            with torch.no_grad():
                responses, logprobs, finish = generate_pipelined(
                    model,
                    prompts,
                    sampling=sampling,
                    group_size=group_size,
                    stopper=stopper,
                    generator=generator,
                    kv_layout=layout_kind,
                    tp_group=tp_group,
                    pp_group=pp_group,
                    return_logprobs=return_logprobs,
                    num_microbatches=num_microbatches,
                )
        finally:
            model.train(was_training)
        return _outputs(responses, logprobs, finish, group_size, return_logprobs)
    try:
        with torch.no_grad():
            layout = _build_layout(
                prompts, group_size, sampling.max_new_tokens, layout_kind, device
            )
            cache = SlotKVCache(layout.tokens_BC.size(0), layout.tokens_BC.size(1))
            first_logits_BV = _prefill(model, prompts, layout, cache, group_size, share_prefix)
            decoder = _Decoder(
                model,
                layout,
                cache,
                sampling,
                stopper,
                generator,
                tp_group,
                return_logprobs,
                group_size,
            )
            decoder.run(first_logits_BV)
    finally:
        model.train(was_training)
    return _outputs(
        decoder.responses, decoder.logprobs, decoder.finish, group_size, return_logprobs
    )


def _outputs(responses, logprobs, finish, group_size, return_logprobs) -> list[GenerationOutput]:
    return [
        GenerationOutput(
            prompt_index=r // group_size,
            sample_index=r % group_size,
            response_ids_R=torch.tensor(responses[r], dtype=torch.long),
            finish_reason=finish[r],
            logprobs_R=torch.tensor(logprobs[r]) if return_logprobs else None,
        )
        for r in range(len(responses))
    ]
