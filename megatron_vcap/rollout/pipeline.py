"""KV-cached generation through pipeline stages (pipeline_model_parallel_size > 1).

The P x G rows are cut into ``Q >= PP`` contiguous micro-batches; each stage keeps, per
micro-batch, a KV cache of its own layers only. Work moves through the stages on a tick clock:
stage s works at tick k on micro-batch ``m = (k - s) mod Q`` at decode step ``t = (k - s) // Q``,
so while stage 1 runs micro-batch m, stage 0 already runs m + 1 (the stages work at the same time,
not in turn). The last stage turns its logits into tokens (its first tensor-parallel rank samples)
and broadcasts them over the pipeline group at the end of the tick; every rank applies them to the
same bookkeeping (responses, stops, cache compaction), so all ranks agree on every micro-batch's
live rows and hence on the shapes they exchange. Micro-batch m's next token is needed by stage 0
Q ticks after its previous step started, and the last stage delivers it PP - 1 ticks after that
start, hence ``Q >= PP``.

Prefill runs first, pipelined the same way over prompts: each prompt once (batch 1; the vision
inputs go to the first stage, which holds the vision tower), its keys/values copied on every stage
into the cache rows of its G samples (group-prefix sharing). ``share_prefix=False`` is not offered
here.

Exchanges between neighbouring stages are paired in the tick that produces them (the receiver
posts its receive in the same tick as the sender's send, with ``batch_isend_irecv``), so no
point-to-point transfer ever spans a broadcast (which would deadlock NCCL).

Tokens and their order of sampling match single-stage generation (``generate.py``): rows are
sampled in ascending order each step, so with the same seed the same tokens come out (with the
``left_pad`` layout; ``aligned`` interleaves first tokens of late prompts differently).

Shape legend as in ``generate.py``: B rows, C cache columns, S prompt tokens, V vocabulary,
H hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_vcap.rollout.generate import _build_layout, _unwrap
from megatron_vcap.rollout.kv_cache import SlotKVCache, new_prefill_context
from megatron_vcap.rollout.sampling import anchor_rows, chosen_token_logprobs, sample_tokens


@dataclass
class _Stage:
    """This rank's place in the pipeline and the groups it talks over."""

    rank: int  # pipeline stage
    size: int
    prev: int | None  # global ranks of the neighbouring stages
    next: int | None
    last: int  # global rank of the last stage of this rank's pipeline
    pp_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup | None
    hidden: int
    dtype: torch.dtype
    device: torch.device

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    @classmethod
    def build(cls, model, pp_group, tp_group, device) -> _Stage:
        config = _unwrap(model).config
        size, rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
        return cls(
            rank=rank,
            size=size,
            prev=dist.get_global_rank(pp_group, rank - 1) if rank > 0 else None,
            next=dist.get_global_rank(pp_group, rank + 1) if rank < size - 1 else None,
            last=dist.get_global_rank(pp_group, size - 1),
            pp_group=pp_group,
            tp_group=tp_group,
            hidden=config.hidden_size,
            dtype=config.params_dtype,
            device=device,
        )


class _MicroBatch:
    """Rows [start, end) of the layout, their cache on this stage, and their decode state."""

    def __init__(self, start: int, end: int, capacity: int, column: int, device):
        self.rows_B = torch.arange(start, end, device=device)
        self.start = start
        self.cache = SlotKVCache(end - start, capacity)
        self.batch_B = self.rows_B.clone()  # cache row i holds layout row batch_B[i]
        self.pending_B = self.rows_B.clone()  # rows still waiting for their first token
        self.column = column
        self.step = 0
        self.active = True


class PipelinedGenerator:
    """One ``generate`` call at PP > 1 (see the module docstring); ``run`` returns the rows'
    (responses, log-probs, finish reasons), identical on every rank."""

    def __init__(self, model, prompts, group_size, params, stopper, generator, stage, kv_layout,
                 num_microbatches, want_logprobs):  # fmt: skip
        self.model, self.prompts, self.group = model, prompts, group_size
        self.params, self.stopper, self.generator = params, stopper, generator
        self.stage, self.want_logprobs = stage, want_logprobs
        self.layout = _build_layout(
            prompts, group_size, params.max_new_tokens, kv_layout, stage.device
        )
        rows = len(prompts) * group_size
        count = max(1, min(num_microbatches, rows))
        self.period = max(count, stage.size)  # Q: ticks between two steps of a micro-batch
        bounds = [round(i * rows / count) for i in range(count + 1)]
        capacity = self.layout.tokens_BC.size(1)
        first = self.layout.first_decode_column
        self.mbs = [
            _MicroBatch(a, b, capacity, first, stage.device) for a, b in zip(bounds, bounds[1:])
        ]
        self.done_all = torch.zeros(rows, dtype=torch.bool, device=stage.device)
        self.responses: list[list[int]] = [[] for _ in range(rows)]
        self.logprobs: list[list[float]] = [[] for _ in range(rows)]
        self.finish: list[str | None] = [None] * rows
        self.first_logits_BV: torch.Tensor | None = None  # last stage only
        self._logits: dict[int, torch.Tensor] = {}  # last stage: micro-batch -> step logits

    # -- model calls and point-to-point --------------------------------------------------------

    def _forward(self, tokens, positions, mask, context, extra, hidden_in):
        if not self.stage.is_first:
            _unwrap(self.model).set_input_tensor(hidden_in)
        out = self.model(
            tokens,
            positions,
            mask,
            inference_context=context,
            runtime_gather_output=True,
            **(extra if self.stage.is_first else {}),
        )
        return out[:, -1].float() if self.stage.is_last else out

    def _exchange(self, send, recv_shape):
        """Send ``send`` to the next stage and receive a ``recv_shape`` tensor from the previous
        one, in one batch of point-to-point operations; returns the received tensor."""
        ops, buf = [], None
        if send is not None and self.stage.next is not None:
            ops.append(dist.P2POp(dist.isend, send.contiguous(), self.stage.next))
        if recv_shape is not None and self.stage.prev is not None:
            buf = torch.empty(recv_shape, dtype=self.stage.dtype, device=self.stage.device)
            ops.append(dist.P2POp(dist.irecv, buf, self.stage.prev))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return buf

    # -- token choice and bookkeeping (every rank) --------------------------------------------

    def _choose(self, rows_b: torch.Tensor, logits_bV: torch.Tensor | None):
        """Tokens (and their log-probs) chosen on the last stage's first TP rank, broadcast
        to its TP group and then over the pipeline group."""
        stage = self.stage
        packed = torch.empty(2, rows_b.numel(), dtype=torch.float64, device=stage.device)
        if stage.is_last:
            tp = stage.tp_group
            leader = tp is None or dist.get_world_size(tp) == 1 or dist.get_rank(tp) == 0
            if leader:
                greedy_b = anchor_rows(rows_b, self.params, self.group)
                tokens_b = sample_tokens(logits_bV, self.params, self.generator, greedy_b)
                packed[0] = tokens_b.double()
                if self.want_logprobs:
                    packed[1] = chosen_token_logprobs(logits_bV, tokens_b, self.params).double()
            if tp is not None and dist.get_world_size(tp) > 1:
                dist.broadcast(packed, src=dist.get_global_rank(tp, 0), group=tp)
        dist.broadcast(packed, src=stage.last, group=stage.pp_group)
        return packed[0].long(), packed[1]

    def _emit(self, rows_b: torch.Tensor, logits_bV: torch.Tensor | None) -> None:
        if rows_b.numel() == 0:
            return
        tokens_b, logp_b = self._choose(rows_b, logits_bV)
        rows = rows_b.tolist()
        lengths = torch.tensor([len(self.responses[r]) for r in rows], device=rows_b.device)
        self.layout.tokens_BC[rows_b, self.layout.gen_start_B[rows_b] + lengths] = tokens_b
        logps = logp_b.tolist()
        for i, (row, token) in enumerate(zip(rows, tokens_b.tolist())):
            self.responses[row].append(token)
            if self.want_logprobs:
                self.logprobs[row].append(logps[i])
            self.finish[row] = self.stopper.check(self.responses[row])
            if self.finish[row] is not None:
                self.done_all[row] = True

    def _compact(self, mb: _MicroBatch, used_columns: int) -> None:
        """As single-stage decoding: drop finished rows once a quarter of the batch is done."""
        done_b = self.done_all[mb.batch_B]
        num_done = int(done_b.sum())
        if num_done == 0 or num_done < max(1, mb.batch_B.numel() // 4):
            return
        keep_b = (~done_b).nonzero().flatten()
        mb.batch_B = mb.batch_B[keep_b]
        if keep_b.numel() and mb.cache.allocated:
            mb.cache.keep_rows(keep_b, used_columns)

    def _begin_step(self, mb: _MicroBatch) -> None:
        """Rows whose prompt ends at this column take their first token; compact."""
        starting = self.layout.gen_start_B[mb.pending_B] == mb.column
        rows_b = mb.pending_B[starting]
        logits = None
        if self.stage.is_last and rows_b.numel():
            logits = self.first_logits_BV[rows_b]
        self._emit(rows_b, logits)
        mb.pending_B = mb.pending_B[~starting]
        self._compact(mb, mb.column)
        mb.active = not bool(self.done_all[mb.rows_B].all())

    def _finish_step(self, index: int) -> None:
        """The last stage's logits of a micro-batch's step -> tokens; advance its column."""
        mb = self.mbs[index]
        generating_B = (self.layout.gen_start_B[mb.batch_B] <= mb.column) & ~self.done_all[
            mb.batch_B
        ]
        logits = self._logits.pop(index)[generating_B] if self.stage.is_last else None
        self._emit(mb.batch_B[generating_B], logits)
        self._compact(mb, mb.column + 1)
        mb.cache.advance()
        mb.column += 1
        mb.step += 1
        self._begin_step(mb)

    # -- phases --------------------------------------------------------------------------------

    def prefill(self) -> None:
        """Each prompt once through the stages (pipelined over prompts); its KV is copied into
        its rows' caches on every stage; the last stage keeps its last-position logits."""
        stage, prompts, device = self.stage, self.prompts, self.stage.device
        first_logits = [None] * len(prompts)
        hidden_in = None
        for tick in range(len(prompts) + stage.size - 1):
            p = tick - stage.rank
            out = None
            if 0 <= p < len(prompts):
                prompt = prompts[p]
                context = new_prefill_context(1, prompt.length)
                out = self._forward(
                    prompt.input_ids_S.to(device)[None],
                    prompt.position_ids_3S.to(device)[:, None],
                    None,
                    context,
                    prompt.vision_kwargs,
                    hidden_in,
                )
                self._copy_prefix(p, context)
                if stage.is_last:
                    first_logits[p] = out[0]
            p_prev = tick - stage.rank + 1  # what the previous stage computes now
            shape = None
            if 0 <= p_prev < len(prompts):
                shape = (prompts[p_prev].length, 1, stage.hidden)
            hidden_in = self._exchange(None if stage.is_last else out, shape)
        if stage.is_last:
            self.first_logits_BV = torch.stack(first_logits).repeat_interleave(self.group, dim=0)

    def _copy_prefix(self, p: int, context) -> None:
        rows = range(p * self.group, (p + 1) * self.group)
        for mb in self.mbs:
            local = [r - mb.start for r in rows if mb.start <= r < mb.start + mb.rows_B.numel()]
            if not local:
                continue
            shift = int(self.layout.shift_B[p * self.group])
            target = torch.tensor(local)
            mb.cache.write_prefix(
                context, torch.zeros_like(target), target, self.prompts[p].length, shift
            )

    def _item(self, tick: int, stage_rank: int) -> _MicroBatch | None:
        """The micro-batch ``stage_rank`` works on at ``tick`` (None when idle)."""
        j = tick - stage_rank
        if j < 0 or j % self.period >= len(self.mbs):
            return None
        mb = self.mbs[j % self.period]
        if not mb.active or mb.step != j // self.period:
            return None
        return mb

    def _decode_step(self, mb: _MicroBatch, hidden_in):
        layout, batch_B = self.layout, mb.batch_B
        column = mb.column
        mask = None
        if layout.pad_BC is not None:
            mask = layout.pad_BC[batch_B, : column + 1][:, None, None, :]
        return self._forward(
            layout.tokens_BC[batch_B, column : column + 1],
            layout.positions_3BC[:, batch_B, column : column + 1],  # rotated keys cached
            mask,
            mb.cache.context,
            {},
            hidden_in,
        )

    def decode(self) -> None:
        stage = self.stage
        for mb in self.mbs:  # ascending rows: the single-stage order of first tokens
            mb.cache.start_decoding(mb.column)
            self._begin_step(mb)
        hidden_in, tick = None, 0
        while not all(f is not None for f in self.finish):
            mine = self._item(tick, stage.rank)
            out = None
            if mine is not None:
                out = self._decode_step(mine, hidden_in)
                if stage.is_last:
                    self._logits[self.mbs.index(mine)] = out
            upstream = self._item(tick, stage.rank - 1) if not stage.is_first else None
            shape = None if upstream is None else (1, upstream.batch_B.numel(), stage.hidden)
            hidden_in = self._exchange(None if stage.is_last else out, shape)
            finished = self._item(tick, stage.size - 1)
            if finished is not None:
                self._finish_step(self.mbs.index(finished))
            tick += 1


def generate_pipelined(model, prompts, *, sampling, group_size, stopper, generator, kv_layout,
                       tp_group, pp_group, return_logprobs, num_microbatches=None):  # fmt: skip
    """Responses, log-probs and finish reasons per row (P x G, prompt-major) at PP > 1."""
    device = next(model.parameters()).device
    stage = _Stage.build(model, pp_group, tp_group, device)
    gen = PipelinedGenerator(
        model,
        prompts,
        group_size,
        sampling,
        stopper,
        generator,
        stage,
        kv_layout,
        num_microbatches or stage.size,
        return_logprobs,
    )
    gen.prefill()
    gen.decode()
    return gen.responses, gen.logprobs, gen.finish
