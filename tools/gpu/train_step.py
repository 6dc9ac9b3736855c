"""Kit section ``train_step``: one GRPO step and one SFT step through ``vcap train``, then HF.

Each mode is launched as a user launches training, ``torchrun --nproc-per-node=1 -m
megatron_vcap train --config <demo recipe> ...``, on the carried fixtures (tiny
Qwen2.5-VL-architecture model, synthetic videos): bf16 and NCCL on a GPU, (bf16 and) gloo in the
dry run, layers by ``model.transformer_impl=auto``. Checks per mode: exit status 0, one metrics
row with finite loss and a non-zero finite gradient norm, the update not skipped, a checkpoint;
then ``convert_mcore_to_hf`` of that checkpoint, ``transformers`` loading the result in fp32,
and its logits equal to our model's loaded from the training checkpoint (fp32, TF32 off) within
1e-3 x max(1, max |logit|) on a text prompt: the trained weights survive the round trip.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tools.gpu.common import SectionContext, SectionResult, device, init_single_rank, kill_tree
from tools.gpu.fixtures import ensure_fixtures

REPO = Path(__file__).resolve().parents[2]
KEPT = ("loss", "grad_norm", "update_skipped", "tokens_per_s", "response_len",
        "reward/total_mean", "time/rollout", "time/ref_logp", "time/update", "num_tokens")  # fmt: skip


def kit_reward(response: str, request) -> float:
    """A dense rule reward (``reward.custom_fn``): a random model never writes the structured
    format, so the paper's rewards would all be 0 and the GRPO update would be a no-op."""
    return sum(ch in "aeiou" for ch in response) / max(len(response), 1)


def _video_backend() -> str:
    try:
        import av  # noqa: F401
    except ImportError:
        return "decord"
    return "pyav"


def train_command(mode: str, paths: dict, run_dir: Path, *, gpu: bool, port: int) -> list[str]:
    from megatron_vcap.demo.demo import recipe_path

    common = [
        f"model.hf_path={paths['model']}", f"data.train_manifest={paths['manifest']}",
        f"train.run_dir={run_dir}", "model.params_dtype=bf16", "model.transformer_impl=auto",
        f"parallel.backend={'nccl' if gpu else 'gloo'}", "train.steps=1", "train.lr=1e-4",
        "data.num_workers=1", f"data.video_backend={_video_backend()}", f"train.mode={mode}",
    ]  # fmt: skip
    if mode == "grpo":
        common += ["grpo.prompts_per_step=2", "grpo.group_size=4", "rollout.max_new_tokens=32",
                   "train.micro_batch_size=4", "train.global_batch_size=8",
                   "reward.custom_fn=tools.gpu.train_step:kit_reward"]  # fmt: skip
    else:
        common += ["train.global_batch_size=4", "train.micro_batch_size=2"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
            f"--master-port={port}", "-m", "megatron_vcap", "train", "--config",
            str(recipe_path()), *common]  # fmt: skip


def start_launch(ctx: SectionContext, mode: str, paths: dict) -> tuple:
    """Start one step of ``mode`` (both modes run at once: they are tiny)."""
    import time

    from megatron_vcap.parallel.multiprocess import find_free_port

    run_dir = ctx.work_dir / f"run_{mode}"
    cmd = train_command(mode, paths, run_dir, gpu=device().type == "cuda", port=find_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    log = open(ctx.work_dir / f"{mode}.log", "w+")  # noqa: SIM115 (closed in finish_launch)
    print(f"$ {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log, run_dir, time.perf_counter()


def finish_launch(ctx, mode: str, launch, res: SectionResult) -> Path | None:
    """Wait for a launch; record its figures and checks; return its checkpoint."""
    import time

    proc, log, run_dir, t0 = launch
    try:
        code = proc.wait(timeout=max(10.0, ctx.time_left() - 10))
    except subprocess.TimeoutExpired:
        kill_tree(proc)  # the agent and its workers (they run in sessions of their own)
        code = proc.wait()
    log.seek(0)
    output = log.read()
    log.close()
    print(f"----- {mode} -----\n{output[-12000:]}", flush=True)
    fig = res.figures.setdefault(mode, {})
    fig["launch_wall_s"] = time.perf_counter() - t0
    if not res.check(f"{mode}: vcap train exit status", code == 0,
                     output[-1500:] if code else "", value=code):  # fmt: skip
        return None
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    res.check(f"{mode}: one metrics row for step 1", [r["step"] for r in rows] == [1])
    row = rows[-1]
    fig.update({k: row[k] for k in KEPT if k in row})
    grad = row.get("grad_norm", float("nan"))
    res.check_finite(f"{mode}: loss finite", row.get("loss", float("nan")))
    res.check(f"{mode}: grad norm finite and > 0", math.isfinite(grad) and grad > 0, value=grad)
    res.check(f"{mode}: update applied", row.get("update_skipped", 1.0) == 0.0)
    ckpt = run_dir / "checkpoints" / "step_0000001"
    if not res.check(f"{mode}: checkpoint written", (ckpt / "metadata.json").is_file()):
        return None
    return ckpt


def check_hf_round_trip(ctx: SectionContext, mode: str, ckpt: Path, res: SectionResult) -> None:
    """Convert to HF, load with transformers (fp32), compare logits with our model (fp32)."""
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    from megatron_vcap.convert.checkpoint import load_model_checkpoint
    from megatron_vcap.convert.mcore_to_hf import convert_mcore_to_hf
    from megatron_vcap.models.config import ModelConfig
    from megatron_vcap.models.hf_config import load_hf_config
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model

    hf_dir = convert_mcore_to_hf(ckpt, ctx.work_dir / f"hf_{mode}", progress=False)
    tensors = {}
    for shard in hf_dir.glob("*.safetensors"):
        tensors.update(load_file(str(shard)))
    finite = all(torch.isfinite(t.float()).all() for t in tensors.values())
    res.check(f"{mode}: converted tensors finite", len(tensors) > 20 and finite, value=len(tensors))
    dev = device()
    hf_config = load_hf_config(hf_dir)
    cls = (Qwen2VLForConditionalGeneration if hf_config.model_type == "qwen2_vl"
           else Qwen2_5_VLForConditionalGeneration)  # fmt: skip
    hf = cls.from_pretrained(str(hf_dir), dtype=torch.float32).to(dev)
    ours = build_qwen_vl_model(hf_config, ModelConfig(params_dtype="fp32", transformer_impl="auto"),
                               init_weights=False)  # fmt: skip
    load_model_checkpoint(ckpt, ours)
    vocab = hf_config.text_config.vocab_size
    ids = torch.randint(0, vocab - 16, (2, 48), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(48).expand(3, 2, 48)
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids.to(dev)).logits.float()
        got = ours.eval()(ids.to(dev), positions.to(dev), None, runtime_gather_output=True).float()
    diff = (got - ref).abs().max().item()
    bound = 1e-3 * max(1.0, ref.abs().max().item())
    res.figures[mode]["hf_round_trip_max_abs"] = diff
    res.check(f"{mode}: transformers logits of the converted checkpoint", diff <= bound,
              f"<= {bound:.3g}", value=diff, bound=bound)  # fmt: skip


def run(ctx: SectionContext) -> SectionResult:
    import torch

    res = SectionResult()
    paths = ensure_fixtures(ctx.fixtures)
    res.figures["backend"] = "nccl" if device().type == "cuda" else "gloo"
    res.figures["video_backend"] = _video_backend()
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    launches = {mode: start_launch(ctx, mode, paths) for mode in ("grpo", "sft")}
    ckpts = {}
    for mode, launch in launches.items():
        ckpts[mode] = finish_launch(ctx, mode, launch, res)
        ctx.save_partial(res)
    init_single_rank()
    torch.backends.cuda.matmul.allow_tf32 = False
    for mode, ckpt in ckpts.items():
        if ckpt is not None:
            check_hf_round_trip(ctx, mode, ckpt, res)
            ctx.save_partial(res)
    return res
