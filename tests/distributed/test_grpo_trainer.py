"""The GRPO trainer on 2 gloo ranks: TP=2 update == TP=1 update, and exact resume.

One spawn runs both checks on a tiny Qwen2.5-VL-architecture model (real HF safetensors, real
synthetic MP4s, the synthetic tokenizer):

* the same rollouts and rewards trained at TP=1 and at TP=2 (reference pass, advantages, clipped
  loss with KL, distributed AdamW step) give the same updated weights, compared after writing
  each as a training checkpoint and converting it to Hugging Face tensors (``mcore-to-hf``);
* ``vcap train``'s entry (``train_main``) run 4 steps straight vs 2 steps, stop, resume, 2 steps
  gives bit-identical weights and the same rollouts (sample ids and response texts) per step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_vcap.parallel.multiprocess import run_on_ranks

GROUP = 4
SFT_LR, SFT_MIN_LR = 1e-3, 1e-4  # SFT_LR is _overrides' train.lr


def toy_reward(response: str, request) -> float:
    """A dense rule reward (``reward.custom_fn``): a random tiny model never produces the
    structured format, so the paper's rewards would all be 0 and the updates would be no-ops."""
    return sum(ch in "aeiou" for ch in response) / max(len(response), 1)


def recipe_path():
    from megatron_vcap.demo.demo import recipe_path as demo_recipe

    return demo_recipe()


def _overrides(ws: dict, run_dir: Path, steps: int) -> list[str]:
    return [
        f"model.hf_path={ws['model']}",
        f"data.train_manifest={ws['manifest']}",
        "data.num_workers=0",
        "data.max_frames=4",
        "data.min_pixels=784",
        "data.max_pixels=3136",
        "rollout.max_new_tokens=24",
        f"grpo.group_size={GROUP}",
        "grpo.prompts_per_step=2",
        "grpo.kl_beta=0.05",
        "train.mode=grpo",
        f"train.steps={steps}",
        "train.lr=1e-3",
        "train.micro_batch_size=3",
        f"train.run_dir={run_dir}",
        "checkpoint.load=auto",
        "checkpoint.save_interval=2",
        "checkpoint.keep_last=2",
        "reward.custom_fn=tests.distributed.test_grpo_trainer:toy_reward",
    ]


def _hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _tp_update(ws: dict, tp: int, rollouts_holder: dict) -> Path:
    """One GRPO update at tensor parallel size ``tp`` on fixed rollouts; returns its checkpoint."""
    from megatron_vcap.config.job import load_job_config
    from megatron_vcap.data.manifest import load_manifest
    from megatron_vcap.eval.reward_eval import _prepare
    from megatron_vcap.parallel.runtime import destroy_distributed, init_distributed
    from megatron_vcap.rl.grpo import GRPOController, RolloutBatch
    from megatron_vcap.trainer.checkpointing import CheckpointManager
    from megatron_vcap.trainer.metrics import gather_rank_metrics
    from megatron_vcap.trainer.metrics_log import PhaseTimer
    from megatron_vcap.trainer.train import build_components

    run_dir = Path(ws["root"]) / f"tp{tp}"
    cfg = load_job_config(
        recipe_path(),
        # Adam's update lr * g / (|g| + eps) flips with float noise where |g| ~ eps; a larger
        # eps keeps the comparison about the gradients, not about rounding near zero.
        _overrides(ws, run_dir, 1)
        + [f"parallel.tensor_model_parallel_size={tp}", "train.adam_eps=1e-4"]
        # The gradient check reads whole reduced gradients (the distributed optimizer would
        # leave each rank only its shard); the TP=2 layout keeps the distributed optimizer.
        + (["parallel.use_distributed_optimizer=false"] if tp == 1 else [])
        # One prompt per generate call: the two prompts' outputs are merged back in order.
        + ["rollout.prompts_per_batch=1"],
        world_size=2,
    )
    ctx = init_distributed(cfg.parallel, seed=cfg.train.seed)
    comps = build_components(cfg, ctx)
    controller = GRPOController(
        cfg,
        ctx,
        comps.bundle,
        comps.reference,
        comps.tokenizer,
        comps.prompt_builder,
        reward_service=None,
    )
    # Both data-parallel ranks of the TP=1 layout train on the same prompts, so the DP mean
    # equals the single TP=2 replica's update.
    items = _prepare(load_manifest(ws["manifest"])[:2], cfg.data, comps.tokenizer)
    controller._rollout_seed = 99  # the same samples on both data-parallel ranks
    if "outputs" not in rollouts_holder:  # generated once, reused by the other layout
        rollouts_holder["outputs"] = controller.generate(items, step=0).outputs
    outputs = rollouts_holder["outputs"]
    rollouts = RolloutBatch(
        items,
        [comps.prompt_builder.prompt_spec(i) for i in items],
        outputs,
        [comps.prompt_builder.decode(o.response_ids_R) for o in outputs],
    )
    if tp == 1:
        _check_dp_uneven_gradients(controller, comps, ctx, items, outputs)
    else:
        _check_collect_rewards(controller, cfg, ctx, items, outputs)
    gen = torch.Generator().manual_seed(11)
    rewards_B = torch.rand(len(outputs), generator=gen)
    valid_B = torch.ones(len(outputs), dtype=torch.bool)
    valid_B[1] = False  # a failed judge call: dropped from its group and the loss
    metrics, _ = controller.train_on(
        rollouts, lambda n: (rewards_B, valid_B, None), PhaseTimer(), step=0
    )
    metrics = gather_rank_metrics(metrics, ctx)  # the loss is summed over data-parallel ranks
    assert metrics["grad_norm"] > 0 and metrics["kl_mean"] >= 0
    ckpt = CheckpointManager(run_dir / "checkpoints", keep_last=1, hf_assets_dir=comps.hf_dir)
    path = ckpt.save(
        1,
        comps.bundle,
        trainer_state={"scheduler": comps.bundle.scheduler.state_dict()},
        rank_state={},
    )
    if tp == 2:
        _check_eval_reward_at_tp2(cfg, ctx, path, ws)
    destroy_distributed(process_group=False)
    # Adam's first step is ~lr * sign(grad): the weights alone would not see a gradient-scale
    # error, so the (scale-sensitive) gradient norm and loss are compared as well.
    return str(path), metrics["grad_norm"], metrics["loss"]


def _check_dp_uneven_gradients(controller, comps, ctx, items, outputs):
    """DP=2 ranks with different token counts, each cut into uneven micro-batches (3 + 1 rows):
    the gradient after Megatron's schedule and DDP reduction must equal plain autograd of the
    token-mean loss over the union of both ranks' samples. The check tells a per-rank token
    mean apart (asserted too), which the same-data-on-every-rank comparison cannot."""
    import dataclasses

    from megatron_vcap.rl.engine import model_vision_kwargs
    from megatron_vcap.rl.grpo import RolloutBatch
    from megatron_vcap.rl.losses import compute_grpo_loss, compute_sequence_logprobs

    adv_PG = torch.randn(2, GROUP, generator=torch.Generator().manual_seed(21))
    specs = [comps.prompt_builder.prompt_spec(i) for i in items]

    def batch_of(prompts, outs):
        batch = controller.build_batch(
            RolloutBatch([items[p] for p in prompts], [specs[p] for p in prompts],
                         [dataclasses.replace(o, prompt_index=prompts.index(o.prompt_index))
                          for o in outs], [""] * len(outs))
        )  # fmt: skip
        key = [(o.prompt_index, o.sample_index) for o in outs]
        batch.adv_B = torch.tensor([float(adv_PG[p, s]) for p, s in key])
        keep = torch.tensor([float((p, s) != (0, 1)) for p, s in key])  # a dropped sample
        batch.loss_mask_BT = batch.loss_mask_BT * keep[:, None]
        return batch

    rank = ctx.dp_rank
    local = batch_of([rank], [o for o in outputs if o.prompt_index == rank])
    micro_batches = local.micro_batches(3)
    assert [mb.num_samples for mb in micro_batches] == [3, 1]
    cfg = controller.cfg
    # Without the KL term (the reference equals the policy here, so it adds no gradient anyway).
    controller.cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, kl_beta=0.0))
    try:
        controller.accumulate_gradients(micro_batches)
    finally:
        controller.cfg = cfg
    model = comps.bundle.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    reduced = [p.main_grad.detach().float().clone() for _, p in named]

    union = batch_of([0, 1], list(outputs))
    logits = model(union.tokens_BT, union.position_ids_3BT, None, runtime_gather_output=False,
                   **model_vision_kwargs(union))  # fmt: skip
    logp_BT, _ = compute_sequence_logprobs(
        logits.float(), union.tokens_BT, temperature=controller.temperature
    )
    mask_BT, adv_B = union.loss_mask_BT, union.adv_B
    tokens = [float(mask_BT[union.prompt_index_B == p].sum()) for p in (0, 1)]
    assert tokens[0] != tokens[1], tokens  # the ranks' token counts differ

    def loss(rows, normaliser):
        kw = dict(clip_eps_low=cfg.grpo.clip_eps_low, clip_eps_high=cfg.grpo.clip_eps_high)
        return compute_grpo_loss(logp_BT[rows], None, None, adv_B[rows], mask_BT[rows],
                                 normaliser=normaliser, **kw)[0]  # fmt: skip

    params = [p for _, p in named]
    everything = torch.ones(union.num_samples, dtype=torch.bool)
    expected = torch.autograd.grad(loss(everything, sum(tokens)), params, retain_graph=True,
                                   allow_unused=True)  # fmt: skip
    rows = [union.prompt_index_B == p for p in (0, 1)]
    per_rank_mean = 0.5 * (loss(rows[0], tokens[0]) + loss(rows[1], tokens[1]))
    wrong = torch.autograd.grad(per_rank_mean, params, allow_unused=True)

    def zeros_if_none(grads):
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]

    expected, wrong = zeros_if_none(expected), zeros_if_none(wrong)
    scale = max(float(g.abs().max()) for g in expected)
    diff = max(float((a - b).abs().max()) for a, b in zip(reduced, expected))
    wrong_diff = max(float((a - b).abs().max()) for a, b in zip(wrong, expected))
    assert scale > 1e-6 and diff < 1e-5 * scale, (diff, scale)
    assert wrong_diff > 1e-2 * scale, (wrong_diff, scale)  # a per-rank mean would fail above


def _check_collect_rewards(controller, cfg, ctx, items, outputs):
    """The real reward path at TP=2: the leader (TP rank 0) scores through a RewardService whose
    judge, a real HTTP server, fails its first request; ``collect_rewards`` applies the drop
    policy and broadcasts rewards and the mask over the model-parallel group, so TP rank 1, which
    has no service, gets the leader's numbers."""
    import torch.distributed as dist

    from megatron_vcap.rewards.config import JudgeConfig
    from megatron_vcap.rewards.service import RewardService
    from megatron_vcap.rl.grpo import RolloutBatch
    from megatron_vcap.structure import render_response
    from megatron_vcap.testing.fake_openai import FakeOpenAIServer

    # Well-formed responses (the tiny random model writes none), so every sample is judged.
    texts = [
        render_response(items[o.prompt_index].sample.subjects, items[o.prompt_index].sample.caption)
        for o in outputs
    ]
    specs = [controller.prompts.prompt_spec(i) for i in items]
    rollouts = RolloutBatch(items, specs, outputs, texts)
    server, results = None, None
    if ctx.tp_rank == 0:
        server = FakeOpenAIServer(script=["http_401"]).start()
        judge = JudgeConfig(kind="openai", base_url=server.base_url, model="m",
                            api_key_env="VCAP_NO_SUCH_KEY", timeout_s=5.0, max_retries=1,
                            backoff_s=0.01, max_backoff_s=0.05)  # fmt: skip
        controller.rewards = RewardService(cfg.reward, judge)
    try:
        handle = controller.submit_rewards(rollouts)
        assert (handle is None) == (ctx.tp_rank != 0)
        rewards_B, valid_B, results = controller.collect_rewards(handle, len(outputs))
    finally:
        if server is not None:
            controller.rewards.close()
            controller.rewards = None
            server.stop()
    gathered = [None, None]
    dist.all_gather_object(gathered, (rewards_B, valid_B, results), group=ctx.tp_group)
    (r0, v0, results), (r1, v1, none) = gathered
    assert none is None and torch.equal(r0, r1) and torch.equal(v0, v1)
    assert v0.tolist() == [not r.failed for r in results]  # reward.on_judge_failure: drop
    assert 1 <= sum(r.failed for r in results) < len(results), [r.failed for r in results]
    torch.testing.assert_close(r0, torch.tensor([r.total for r in results]), rtol=0, atol=1e-6)


def _check_eval_reward_at_tp2(cfg, ctx, ckpt_path, ws):
    """``vcap eval reward``'s entry on the TP=2 checkpoint: one judge (RewardService) per model
    replica, on TP rank 0; both ranks return the same summary of every held-out sample."""
    import megatron_vcap.rewards.service as service_mod
    from megatron_vcap.eval.reward_eval import evaluate_main

    built = []

    class CountingService(service_mod.RewardService):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    real = service_mod.RewardService
    service_mod.RewardService = CountingService
    try:
        out = Path(ws["root"]) / "eval_tp2.json"
        summary = evaluate_main(cfg, str(ckpt_path), ws["manifest"], str(out), batch_size=3)
    finally:
        service_mod.RewardService = real
    assert len(built) == (1 if ctx.tp_rank == 0 else 0), (ctx.tp_rank, built)
    assert summary["num_samples"] == 4, summary  # the manifest's 4 samples, each scored once
    if ctx.rank == 0:
        assert len(json.loads(out.read_text())["samples"]) == 4


def _resume_runs(ws: dict) -> dict:
    from megatron_vcap.config.job import load_job_config
    from megatron_vcap.trainer.train import train_main

    root = Path(ws["root"])
    for run_dir, steps in ((root / "straight", 4), (root / "resumed", 2), (root / "resumed", 4)):
        # Two updates per rollout batch: the old-log-prob pass and the clipped ratio are live.
        overrides = _overrides(ws, run_dir, steps) + ["grpo.updates_per_batch=2"]
        train_main(load_job_config(recipe_path(), overrides, world_size=2))
    return {}


def _sft_run(ws: dict) -> None:
    """SFT under a cosine schedule, 3 steps, then extended to 5 by a relaunch."""
    from megatron_vcap.config.job import load_job_config
    from megatron_vcap.trainer.train import train_main

    for steps in (3, 5):
        overrides = _overrides(ws, Path(ws["root"]) / "sft", steps) + [
            "train.mode=sft",
            "train.global_batch_size=4",
            "train.micro_batch_size=1",
            "train.lr_schedule=cosine",
            f"train.min_lr={SFT_MIN_LR}",
            "train.warmup_steps=1",
        ]
        train_main(load_job_config(recipe_path(), overrides, world_size=2))


def _all_checks(ws: dict):
    import torch.distributed as dist

    holder: dict = {}
    results = {tp: _tp_update(ws, tp, holder) for tp in (1, 2)}
    _resume_runs(ws)
    _sft_run(ws)
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from megatron_vcap.data.synth import make_synthetic_dataset
    from megatron_vcap.demo.demo import DemoSettings, build_model_dir
    from megatron_vcap.models.hf_config import load_hf_config
    from megatron_vcap.models.presets import build_tiny_hf_model

    root = tmp_path_factory.mktemp("grpo_trainer")
    data = make_synthetic_dataset(root / "data", 4, seed=5, width=64, height=48, fps=4, seconds=2)
    model_dir = build_model_dir(
        root, data.tokenizer_dir, DemoSettings(hidden=64, layers=2, vision_depth=2)
    )
    build_tiny_hf_model(load_hf_config(model_dir), seed=3).save_pretrained(model_dir)
    return {"root": str(root), "model": str(model_dir), "manifest": str(data.manifest)}


@pytest.mark.timeout(1200)
def test_grpo_tp2_update_and_exact_resume(workspace):
    from megatron_vcap.convert.mcore_to_hf import convert_mcore_to_hf

    results = run_on_ranks(_all_checks, 2, workspace, timeout=1100)[0]
    paths = {tp: r[0] for tp, r in results.items()}
    root = Path(workspace["root"])
    (_, norm1, loss1), (_, norm2, loss2) = results[1], results[2]
    assert norm1 > 0 and abs(norm1 - norm2) < 1e-5 * norm1, (norm1, norm2)
    assert abs(loss1 - loss2) < 1e-6, (loss1, loss2)

    # TP=2 vs TP=1: same updated weights, and the update really moved them.
    initial = _hf_tensors(Path(workspace["model"]))
    tp1 = _hf_tensors(convert_mcore_to_hf(paths[1], root / "hf_tp1", progress=False))
    tp2 = _hf_tensors(convert_mcore_to_hf(paths[2], root / "hf_tp2", progress=False))
    assert set(tp1) == set(tp2) and len(tp1) > 20
    moved = max(float((tp1[k] - initial[k]).abs().max()) for k in tp1)
    assert moved > 1e-4, "the GRPO update did not change the weights"
    for name in tp1:
        diff = float((tp1[name] - tp2[name]).abs().max())
        assert diff < 1e-5, f"{name}: TP=2 update differs from TP=1 by {diff}"

    # Resume: bit-identical weights and the same rollouts at every step.
    straight = _hf_tensors(
        convert_mcore_to_hf(
            root / "straight/checkpoints/step_0000004", root / "hf_straight", progress=False
        )
    )
    resumed = _hf_tensors(
        convert_mcore_to_hf(
            root / "resumed/checkpoints/step_0000004", root / "hf_resumed", progress=False
        )
    )
    assert max(float((straight[k] - initial[k]).abs().max()) for k in straight) > 1e-4
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), f"{name} differs after resume"
    for rank in (0, 1):
        lines = [
            [
                json.loads(x)
                for x in (root / run / "rollouts" / f"dp_rank_{rank:03d}.jsonl")
                .read_text()
                .splitlines()
            ]
            for run in ("straight", "resumed")
        ]
        key = [
            [(r["step"], r["sample_id"], r["response"], r["reward"]) for r in rows]
            for rows in lines
        ]
        assert len(key[0]) == 4 * GROUP and key[0] == key[1]
        assert len({r[3] for r in key[0]}) > 1, "rewards without variance train nothing"
    assert (
        json.loads((root / "resumed/checkpoints/step_0000004/vcap_checkpoint.json").read_text())[
            "step"
        ]
        == 4
    )

    # The second update of each batch sees a ratio != 1 against the sampling policy.
    grpo_rows = [json.loads(x) for x in (root / "straight/metrics.jsonl").read_text().splitlines()]
    assert all(r["ratio_max"] > 1.0 + 1e-6 or r["ratio_min"] < 1.0 - 1e-6 for r in grpo_rows)

    # SFT on the same pipeline (micro-batches of 1, DP=2): the target NLL falls.
    sft = [json.loads(x) for x in (root / "sft/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft] == [1, 2, 3, 4, 5]
    assert sft[-1]["nll_mean"] < sft[0]["nll_mean"], [r["nll_mean"] for r in sft]
    # The loss is the token mean over both ranks' targets, so the DP merge of nll_mean must be
    # token-weighted to equal it (the ranks' target lengths differ: an unweighted mean of the
    # two ranks' means is off by ~1e-4 relative here).
    for r in sft:
        assert abs(r["nll_mean"] - r["loss"]) < 1e-6 * r["loss"], (r["nll_mean"], r["loss"])

    # Extended 3 -> 5 steps: steps 1-3 used the 3-step cosine, steps 4-5 continue the config's
    # 5-step cosine from step 3 (warmup 1: the update of step k uses the LR at k - 1).
    def cosine(n, steps):
        if n <= 1:
            return SFT_LR * n
        t = (n - 1) / (steps - 1)
        return SFT_MIN_LR + (SFT_LR - SFT_MIN_LR) * (1 + math.cos(math.pi * t)) / 2

    expected = [cosine(n, 3) for n in range(3)] + [cosine(n, 5) for n in (3, 4)]
    assert [r["lr"] for r in sft] == pytest.approx(expected, rel=1e-9)
