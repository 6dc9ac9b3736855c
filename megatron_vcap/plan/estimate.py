"""What a layout costs: per-GPU memory, FLOPs per step, step time, and the layouts that fit.

Every figure is a closed formula of the config and the model shape (``arch.ModelShape``); the
formulas are written next to the code and repeated in ``tests/unit/test_plan.py`` with the
7B recipe worked by hand. They are estimates for queueing decisions, not measurements.

Memory per GPU (bytes; t, p, d = TP, PP, DP; "params on a GPU" = params / (t * p): the
replicated norms and biases are counted as sharded, < 0.1 % of a 7B model):

* weights = bytes(params_dtype) * total / (t p); grads = 4 * trainable / (t p) (fp32 main grads);
* optimizer = (12 | 8 for fp32 params) * trainable / (t p), divided by d with the distributed
  optimizer (fp32 main params + Adam m + v);
* activations, one micro-batch of ``micro_batch_size`` rows of S = prompt + response tokens:
  per LM layer and token 2 * (4h / s + (2h + 2 g dh + 3f) / t) bytes with s = t under sequence
  parallel else 1 (norm inputs, q/k/v, attention output, SwiGLU's two inputs and output; flash
  attention keeps no S x S matrix), or 2h / s with full recompute plus one layer's worth; times
  L layers (1F1B keeps p micro-batches of L/p layers); plus fp32 logits and their gradient,
  2 * 4 * S * V / t; plus the vision tower's when it is trained (same formula on its shape);
* kv_cache (rollout): rows = min(prompts_per_batch, prompts per DP rank) * G, keys and values of
  L layers, max(g / t, 1) groups of dh, bf16: allocated for rows x (prompt + response) columns
  (our static cache copies the shared prefix into each row), and, for comparison, what a paged
  cache sharing the prefix would hold: prompts x prompt + rows x response;
* reference: a bf16 copy of the weights, resident on GPU, or moved in for its pass only
  (``grpo.reference_on_cpu``; then it costs host memory);
* total = weights + grads + optimizer + resident reference + max(activations, kv_cache,
  reference moved in): the three phases (update, rollout, reference pass) do not overlap.

FLOPs per step (whole job): a forward pass costs 2 * N_active * tokens + 2 * L * h * S^2 per
sequence (causal attention: QK^T and AV at half of 4 S^2 h each layer); backward = 2 x forward
(+1 forward with full recompute). GRPO runs per sample: a reference forward (kl_beta > 0), an
old-log-prob forward when updates_per_batch > 1, and updates_per_batch forward+backward passes;
each pass also runs the vision tower forward (2 * N_vision * patches + 4 * Lv * hv * patches^2
... windowed attention is bounded by the full one). Rollout: prefill 2 N P + 2 L h P^2 per
prompt (G times without prefix sharing); decode 2 N + 4 L h (P + R/2) per generated token.
Step time = training FLOPs / (GPUs * peak * MFU) + prefill the same way + decode bounded by
HBM bandwidth: every decode step reads this GPU's weights and the live KV cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_vcap.plan.arch import ModelShape

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense
    hbm_tb_s: float


GPUS = {
    # NVIDIA datasheets: H100 SXM 80 GB (989 TFLOPS dense bf16, 3.35 TB/s), H200 141 GB (4.8 TB/s).
    "h100-80gb": GPU("h100-80gb", 80e9 / GIB, 989.0, 3.35),
    "h200-141gb": GPU("h200-141gb", 141e9 / GIB, 989.0, 4.8),
}
USABLE_FRACTION = 0.9  # CUDA context, NCCL buffers and allocator fragmentation take the rest
DEFAULT_MFU = 0.35
PROMPT_TEXT_TOKENS = 128  # system + instruction text around the video in our prompt template


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int


@dataclass
class Workload:
    """The sizes a step runs at, taken from a JobConfig."""

    prompt_tokens: int
    response_tokens: int
    video_tokens: int  # merged tokens in the LM
    vision_patches: int  # tokens in the vision tower (before the 2x2 merge)
    group_size: int
    prompts_per_step: int
    prompts_per_batch: int
    micro_batch_size: int
    updates_per_batch: int
    mode: str
    kl: bool
    reference_on_cpu: bool
    share_prefix: bool
    freeze_vision: bool
    freeze_merger: bool
    recompute: str
    sequence_parallel: bool
    distributed_optimizer: bool
    params_bytes: int


def build_workload(cfg) -> Workload:
    d, s = cfg.data, cfg.model
    merged_px = (14 * 2) ** 2  # one LM token = a 2x2 group of 14 px patches
    per_frame_pair = d.max_pixels // merged_px
    video_tokens = (d.max_frames // 2) * per_frame_pair
    grpo = cfg.train.mode == "grpo"
    return Workload(
        prompt_tokens=video_tokens + PROMPT_TEXT_TOKENS,
        # SFT targets are reference captions: rollout.max_new_tokens bounds them as well.
        response_tokens=cfg.rollout.max_new_tokens,
        video_tokens=video_tokens,
        vision_patches=4 * video_tokens,
        group_size=cfg.grpo.group_size if grpo else 1,
        prompts_per_step=cfg.grpo.prompts_per_step if grpo else cfg.train.global_batch_size,
        prompts_per_batch=cfg.rollout.prompts_per_batch,
        micro_batch_size=cfg.train.micro_batch_size,
        updates_per_batch=cfg.grpo.updates_per_batch if grpo else 1,
        mode=cfg.train.mode,
        kl=grpo and cfg.grpo.kl_beta > 0,
        reference_on_cpu=cfg.grpo.reference_on_cpu,
        share_prefix=cfg.rollout.share_prefix,
        freeze_vision=s.freeze_vision,
        freeze_merger=s.freeze_merger,
        recompute=s.recompute,
        sequence_parallel=cfg.parallel.sequence_parallel,
        distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        params_bytes=2 if s.params_dtype in ("bf16", "fp16") else 4,
    )


def trainable_params(m: ModelShape, w: Workload) -> int:
    n = m.lm_params()
    if not w.freeze_merger:
        n += m.merger_params()
    if not w.freeze_vision:
        n += m.vision_params()
    return n


def _layer_act_bytes(h, kv_dim, ffn, t, sp, recompute) -> float:
    """Activation bytes per layer and token (bf16), see the module docstring."""
    s = t if sp else 1
    if recompute == "full":
        return 2 * h / s
    return 2 * (4 * h / s + (2 * h + 2 * kv_dim + 3 * ffn) / t)


def memory(m: ModelShape, w: Workload, lay: Layout) -> dict[str, float]:
    """Per-GPU bytes by kind, and the total (see the module docstring)."""
    t, p, d = lay.tp, lay.pp, lay.dp
    shard = t * p
    total_p, train_p = m.total_params(), trainable_params(m, w)
    weights = w.params_bytes * total_p / shard
    grads = 4 * train_p / shard
    opt_bytes = 12 if w.params_bytes == 2 else 8
    optimizer = opt_bytes * train_p / shard / (d if w.distributed_optimizer else 1)

    seq = w.prompt_tokens + w.response_tokens
    kv_dim = m.kv_heads * m.head_dim
    per_tok = _layer_act_bytes(m.hidden, kv_dim, m.ffn, t, w.sequence_parallel, w.recompute)
    act = w.micro_batch_size * seq * m.layers * per_tok
    if w.recompute == "full":  # the layer being recomputed holds its full activations
        act += (
            w.micro_batch_size
            * seq
            * _layer_act_bytes(m.hidden, kv_dim, m.ffn, t, w.sequence_parallel, "none")
        )
    act += w.micro_batch_size * 2 * 4 * seq * m.vocab / t  # fp32 logits + their gradient
    if not w.freeze_vision:
        vt = _layer_act_bytes(m.vision_hidden, m.vision_hidden, m.vision_ffn, t, False, w.recompute)
        act += w.micro_batch_size * w.vision_patches * m.vision_layers * vt

    kv_cache = kv_shared = 0.0
    if w.mode == "grpo":
        prompts = min(w.prompts_per_batch, max(w.prompts_per_step // d, 1))
        rows = prompts * w.group_size
        # Each pipeline stage caches its own layers' keys and values (rollout/pipeline.py).
        per_token = 2 * (m.layers / p) * max(m.kv_heads / t, 1) * m.head_dim * 2
        kv_cache = rows * seq * per_token
        kv_shared = (prompts * w.prompt_tokens + rows * w.response_tokens) * per_token

    reference = 2 * total_p / shard if w.kl else 0.0
    resident_ref = 0.0 if w.reference_on_cpu else reference
    moved_in = reference if w.reference_on_cpu else 0.0
    total = weights + grads + optimizer + resident_ref + max(act, kv_cache, moved_in)
    return {
        "weights": weights,
        "grads": grads,
        "optimizer": optimizer,
        "activations": act,
        "kv_cache": kv_cache,
        "kv_cache_shared_prefix": kv_shared,
        "reference": reference,
        "total": total,
    }


def _vision_fwd_flops(m: ModelShape, patches: int) -> float:
    return 2 * m.vision_params() * patches + 4 * m.vision_layers * m.vision_hidden * patches**2


def _fwd_flops(m: ModelShape, w: Workload, seq: int) -> float:
    return 2 * m.lm_params() * seq + 2 * m.layers * m.hidden * seq**2


def flops(m: ModelShape, w: Workload) -> dict[str, float]:
    """FLOPs of one step of the whole job, by phase (see the module docstring)."""
    seq = w.prompt_tokens + w.response_tokens
    samples = w.prompts_per_step * w.group_size
    fwd = _fwd_flops(m, w, seq) + _vision_fwd_flops(m, w.vision_patches)
    bwd_factor = 3 if w.recompute == "full" else 2
    train = samples * w.updates_per_batch * fwd * (1 + bwd_factor)
    if w.kl:
        train += samples * fwd
    if w.updates_per_batch > 1:
        train += samples * fwd
    out = {"train": train, "prefill": 0.0, "decode": 0.0}
    if w.mode == "grpo":
        p = w.prompt_tokens
        per_prompt = 2 * m.lm_params() * p + 2 * m.layers * m.hidden * p**2
        per_prompt += _vision_fwd_flops(m, w.vision_patches)
        prefills = w.prompts_per_step * (1 if w.share_prefix else w.group_size)
        out["prefill"] = prefills * per_prompt
        per_token = 2 * m.lm_params() + 4 * m.layers * m.hidden * (p + w.response_tokens / 2)
        out["decode"] = samples * w.response_tokens * per_token
    out["total"] = out["train"] + out["prefill"] + out["decode"]
    return out


def step_seconds(
    m: ModelShape, w: Workload, lay: Layout, gpu: GPU, mfu: float, mem: dict
) -> dict[str, float]:
    n_gpus = lay.tp * lay.pp * lay.dp
    f = flops(m, w)
    compute = n_gpus * gpu.bf16_tflops * 1e12 * mfu
    out = {"train": f["train"] / compute, "prefill": f["prefill"] / compute, "decode": 0.0}
    if w.mode == "grpo":
        # Each DP rank decodes its rows; a decode step reads this GPU's weights and the average
        # live KV cache (half the columns), at the HBM bandwidth.
        prompts_rank = max(w.prompts_per_step // lay.dp, 1)
        batches = -(-prompts_rank // min(w.prompts_per_batch, prompts_rank))
        read = mem["weights"] + mem["kv_cache"] / 2
        out["decode"] = batches * w.response_tokens * read / (gpu.hbm_tb_s * 1e12)
    out["total"] = out["train"] + out["prefill"] + out["decode"]
    return out


def candidate_layouts(m: ModelShape, w: Workload, nodes: int, gpus_per_node: int):
    """TP within a node dividing the heads and the KV groups (Megatron's rule); PP dividing the
    layers (GRPO rollouts run through the stages too); DP dividing the prompts (or samples) per
    step."""
    n = nodes * gpus_per_node
    for tp in range(1, gpus_per_node + 1):
        if gpus_per_node % tp or m.heads % tp or m.kv_heads % tp:
            continue
        for pp in range(1, n // tp + 1):
            if (n // tp) % pp or m.layers % pp:
                continue
            dp = n // (tp * pp)
            if w.prompts_per_step % dp:
                continue
            yield Layout(tp, pp, dp)


def plan(m: ModelShape, w: Workload, nodes: int, gpus_per_node: int, gpu: GPU, mfu: float):
    """Every candidate layout with its memory, time and verdict; fitting ones first, fastest
    first."""
    usable = gpu.memory_gib * USABLE_FRACTION
    rows = []
    for lay in candidate_layouts(m, w, nodes, gpus_per_node):
        mem = memory(m, w, lay)
        secs = step_seconds(m, w, lay, gpu, mfu, mem)
        total_gib = mem["total"] / GIB
        rows.append(
            {
                **asdict(lay),
                "memory_gib": {k: v / GIB for k, v in mem.items()},
                "step_seconds": secs,
                "fits": total_gib <= usable,
                "short_gib": max(0.0, total_gib - usable),
            }
        )
    rows.sort(key=lambda r: (not r["fits"], r["step_seconds"]["total"], r["tp"]))
    return rows
