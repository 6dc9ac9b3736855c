"""The loader across 2 data-parallel gloo ranks: sharding, deterministic order, exact resume.

One 2-rank run: each rank reads 4 items, the ranks' loader states are gathered and merged as a
checkpoint would store them, each rank reads 6 more; then fresh loaders restored from the merged
state must yield exactly those 6, and a fresh loader read from the start must yield all 10 in
the same order. One manifest line points at a missing file, so skipping and its counters are
part of the resumed state.
"""

from __future__ import annotations

import json

from megatron_vcap.parallel.multiprocess import run_on_ranks

NUM_VIDEOS = 5  # + 1 missing file = 6 samples, 3 per rank per epoch


def _rank_main(manifest: str, tokenizer_dir: str):
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from megatron_vcap.data.config import DataConfig
    from megatron_vcap.data.loader import build_loader, merge_rank_states
    from megatron_vcap.data.manifest import load_manifest

    # Plain gloo ranks: the loader only needs (dp_rank, dp_size) and a group to gather states
    # over; Megatron's model-parallel groups would add ~15 s of set-up here and test nothing.
    dist.init_process_group("gloo")
    dp_rank, dp_size, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    samples = load_manifest(manifest)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = DataConfig(min_pixels=28 * 28 * 4, max_pixels=96 * 64, num_workers=1, prefetch=2)

    def make():
        return build_loader(samples, cfg, tok, dp_rank=dp_rank, dp_size=dp_size, seed=5, mode="sft")

    def ids(items):
        return [(it.sample.id, it.epoch, it.position) for it in items]

    first = make()
    before = ids(first.next_batch(4))
    states = [None] * dp_size
    dist.all_gather_object(states, first.state_dict(), group=group)
    checkpoint = json.loads(json.dumps(merge_rank_states(states)))  # as saved on disk
    after = ids(first.next_batch(6))
    metrics_after = first.metrics()
    first.close()

    resumed = make()
    resumed.load_state_dict(checkpoint)
    resumed_ids = ids(resumed.next_batch(6))
    resumed_metrics = resumed.metrics()
    resumed.close()

    replay = make()
    replay_ids = ids(replay.next_batch(10))
    replay.close()
    return {
        "dp_rank": dp_rank,
        "dp_size": dp_size,
        "before": before,
        "after": after,
        "resumed": resumed_ids,
        "replay": replay_ids,
        "metrics_after": metrics_after,
        "resumed_metrics": resumed_metrics,
        "consumed_at_save": [st["consumed"] for st in checkpoint["per_rank"]],
    }


def test_loader_sharding_determinism_and_resume_on_two_ranks(tmp_path):
    from megatron_vcap.data.synth import make_synthetic_dataset

    paths = make_synthetic_dataset(
        tmp_path, NUM_VIDEOS, seed=2, width=96, height=64, fps=6.0, seconds=2.0
    )
    lines = paths.manifest.read_text().splitlines()
    lines.insert(2, json.dumps({"id": "lost", "video": "videos/lost.mp4", "caption": "x"}))
    paths.manifest.write_text("\n".join(lines) + "\n")

    results = run_on_ranks(
        _rank_main, 2, str(paths.manifest), str(paths.tokenizer_dir), timeout=300
    )
    assert [r["dp_rank"] for r in results] == [0, 1] and results[0]["dp_size"] == 2
    all_ids = {f"synth_{i:05d}" for i in range(NUM_VIDEOS)} | {"lost"}
    for r in results:
        # Exact resume: the restored loader continues with the next unseen position.
        assert r["resumed"] == r["after"]
        assert r["resumed_metrics"] == r["metrics_after"]
        # Deterministic: the same seed replays the same stream, skips included.
        assert r["replay"] == r["before"] + r["after"]
        positions = [p for _, _, p in r["replay"]]
        assert positions == sorted(positions)
        assert all(sid != "lost" for sid, _, _ in r["replay"])
    # Each epoch is a partition of all 6 samples into the ranks' 3-sample shards; "lost" is
    # the one position a rank skipped (and counted) per epoch that contains it.
    for epoch in (0, 1):
        seen = [{sid for sid, e, _ in r["replay"] if e == epoch} for r in results]
        skipped = sum(3 - len([1 for _, e, _ in r["replay"] if e == epoch]) for r in results)
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == all_ids - {"lost"} and skipped == 1
    total_skips = sum(r["metrics_after"].get("data/skipped/missing_file", 0) for r in results)
    consumed = sum(r["metrics_after"]["data/consumed"] for r in results)
    assert total_skips >= 2 and consumed == 20 + total_skips
    # Epoch orders differ (shuffled per epoch) but both ranks agree on them: shards disjoint.
    epoch0 = [sid for r in results for sid, e, _ in r["replay"] if e == 0]
    epoch1 = [sid for r in results for sid, e, _ in r["replay"] if e == 1]
    assert epoch0 != epoch1
