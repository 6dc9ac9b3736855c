"""``vcap plan --config F --nodes N --gpus-per-node G [--gpu h100-80gb|h200-141gb] [--json]``.

Loads the job config (with ``a.b=c`` overrides) and the model's shape (``model.hf_path``'s
config.json, or the published shape of a known release), then prints every layout that the
cluster shape allows with its per-GPU memory and estimated step time, fitting ones first. With
``--json``: one object with ``memory_gib`` ({weights, grads, optimizer, activations, kv_cache,
reference, total}) for the config's own layout (or the best one when it is not a candidate),
``flops`` per step and ``layouts`` (all candidates, best first).
"""

from __future__ import annotations

import json

from megatron_vcap.plan.estimate import DEFAULT_MFU, GIB, GPUS, USABLE_FRACTION

MEMORY_KEYS = ("weights", "grads", "optimizer", "activations", "kv_cache", "reference", "total")


def build_plan(cfg, nodes: int, gpus_per_node: int, gpu_name: str, mfu: float) -> dict:
    from megatron_vcap.plan.arch import load_shape
    from megatron_vcap.plan.estimate import build_workload, flops, plan

    if nodes < 1 or gpus_per_node < 1:
        raise ValueError("--nodes and --gpus-per-node must be >= 1")
    shape, source = load_shape(cfg.model.hf_path)
    work = build_workload(cfg)
    gpu = GPUS[gpu_name]
    layouts = plan(shape, work, nodes, gpus_per_node, gpu, mfu)
    own = (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    chosen = next((r for r in layouts if (r["tp"], r["pp"]) == own), None)
    return {
        "model": source,
        "params": {"total": shape.total_params(), "lm": shape.lm_params(),
                   "vision": shape.vision_params(), "merger": shape.merger_params()},
        "gpu": gpu.name,
        "usable_gib": gpu.memory_gib * USABLE_FRACTION,
        "gpus": nodes * gpus_per_node,
        "mfu": mfu,
        "sequence": {"prompt": work.prompt_tokens, "response": work.response_tokens,
                     "video_tokens": work.video_tokens},
        "config_layout": {"tp": own[0], "pp": own[1], "candidate": chosen is not None},
        "memory_gib": {k: (chosen or layouts[0])["memory_gib"][k] for k in MEMORY_KEYS}
        if layouts
        else {},
        "flops": flops(shape, work),
        "layouts": layouts,
    }  # fmt: skip


def verdict(row: dict, usable_gib: float) -> str:
    total = row["memory_gib"]["total"]
    if row["fits"]:
        return f"fits: {total:.1f} of {usable_gib:.1f} GiB usable per GPU"
    return (
        f"short by {row['short_gib']:.1f} GiB per GPU ({total:.1f} needed, {usable_gib:.1f} usable)"
    )


def format_plan(p: dict) -> str:
    lines = [
        f"model: {p['model']} ({p['params']['total'] / 1e9:.2f} B params)",
        f"cluster: {p['gpus']} x {p['gpu']} ({p['usable_gib']:.1f} GiB usable each), "
        f"MFU {p['mfu']:.2f}; sequence {p['sequence']['prompt']} prompt "
        f"({p['sequence']['video_tokens']} video) + {p['sequence']['response']} response tokens",
        f"FLOPs per step: {p['flops']['total']:.3e} (train {p['flops']['train']:.3e}, "
        f"prefill {p['flops']['prefill']:.3e}, decode {p['flops']['decode']:.3e})",
        "",
        f"{'TP':>3} {'PP':>3} {'DP':>3}  {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} "
        f"{'kv':>7} {'kv(shr)':>7} {'ref':>6} {'total':>7}  {'step s':>7}  verdict",
    ]
    for r in p["layouts"]:
        m = r["memory_gib"]
        lines.append(
            f"{r['tp']:>3} {r['pp']:>3} {r['dp']:>3}  {m['weights']:>8.1f} {m['grads']:>7.1f} "
            f"{m['optimizer']:>7.1f} {m['activations']:>7.1f} {m['kv_cache']:>7.1f} "
            f"{m['kv_cache_shared_prefix']:>7.1f} {m['reference']:>6.1f} {m['total']:>7.1f}  "
            f"{r['step_seconds']['total']:>7.1f}  {verdict(r, p['usable_gib'])}"
        )
    if not p["layouts"]:
        lines.append("(no layout: check heads / KV groups / prompts_per_step divisibility)")
    lines.append("memory in GiB per GPU; total = persistent + the largest phase (update, "
                 "rollout, reference); kv(shr): a paged cache sharing each prompt's prefix")  # fmt: skip
    return "\n".join(lines)


def check_verdict(cfg, world_size: int, gpu_name: str = "h100-80gb") -> str:
    """The plan's one-line verdict for the config's layout at ``world_size`` GPUs (8 per node)."""
    per_node = min(world_size, 8)
    nodes = max(world_size // per_node, 1)
    p = build_plan(cfg, nodes, per_node, gpu_name, DEFAULT_MFU)
    t, pp = p["config_layout"]["tp"], p["config_layout"]["pp"]
    row = next((r for r in p["layouts"] if (r["tp"], r["pp"]) == (t, pp)), None)
    if row is None:
        return f"plan ({gpu_name}): TP={t} PP={pp} is not a layout the planner considers here"
    return f"plan ({gpu_name}, TP={t} PP={pp} DP={row['dp']}): {verdict(row, p['usable_gib'])}"


def run(args) -> int:
    from megatron_vcap.config.job import load_job_config

    cfg = load_job_config(args.config, args.overrides)
    p = build_plan(cfg, args.nodes, args.gpus_per_node, args.gpu, args.mfu)
    print(json.dumps(p, indent=1) if args.json else format_plan(p))
    return 0


def register(sub) -> None:
    q = sub.add_parser("plan", help="memory / FLOPs / layouts of a job before queueing")
    q.add_argument("--config", required=True)
    q.add_argument("--nodes", type=int, required=True)
    q.add_argument("--gpus-per-node", type=int, required=True)
    q.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb")
    q.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation")
    q.add_argument("--json", action="store_true", help="one JSON object")
    q.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.max_new_tokens=512")
    q.set_defaults(func=run)


__all__ = ["GIB", "build_plan", "check_verdict", "format_plan"]
