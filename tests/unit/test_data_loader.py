"""The loader in one process: order, worker prefetch, error policy and metrics, state checks.

Multi-rank sharding and resume are covered in tests/distributed/test_data_loader_dp.py.
"""

from __future__ import annotations

import json
import logging

import pytest

from megatron_vcap.data.config import DataConfig
from megatron_vcap.data.loader import DataLoadError, ShardedStream, build_loader, epoch_order
from megatron_vcap.data.manifest import load_manifest
from megatron_vcap.data.prompts import IGNORE_INDEX
from megatron_vcap.data.synth import make_synthetic_dataset
from megatron_vcap.structure import render_response

CFG = dict(min_pixels=28 * 28 * 4, max_pixels=96 * 64, prefetch=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("synth")
    paths = make_synthetic_dataset(root, 4, seed=9, width=96, height=64, fps=6.0, seconds=2.0)
    (root / "videos" / "junk.mp4").write_bytes(b"junk" * 100)
    lines = paths.manifest.read_text().splitlines()
    lines.insert(1, json.dumps({"id": "gone", "video": "videos/gone.mp4", "caption": "x"}))
    lines.insert(3, json.dumps({"id": "junk", "video": "videos/junk.mp4", "caption": "x"}))
    bad = root / "with_bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    tok = AutoTokenizer.from_pretrained(str(paths.tokenizer_dir))
    return load_manifest(paths.manifest), load_manifest(bad), tok


def _ids(items):
    return [it.sample.id for it in items]


def test_stream_order_is_a_seeded_sharded_permutation():
    stream = [ShardedStream(7, r, 3, seed=4, shuffle=True) for r in range(3)]
    assert stream[0].per_rank == 3
    for epoch in range(3):
        order = epoch_order(7, 4, epoch, True)
        assert sorted(order) == list(range(7))
        picked = [stream[r].locate(epoch * 3 + j) for r in range(3) for j in range(3)]
        assert {e for e, _ in picked} == {epoch}
        # 9 slots over 7 samples: every sample at least once, padding wraps to the start.
        assert {i for _, i in picked} == set(range(7))
    assert epoch_order(7, 4, 0, True) != epoch_order(7, 4, 1, True)
    assert epoch_order(7, 4, 0, True) == epoch_order(7, 4, 0, True)
    assert epoch_order(7, 4, 0, False) == list(range(7))


def test_items_order_and_workers(data):
    good, _, tok = data
    inline = build_loader(
        good, DataConfig(num_workers=0, **CFG), tok, dp_rank=0, dp_size=1, seed=1, mode="rollout"
    )
    workers = build_loader(
        good, DataConfig(num_workers=2, **CFG), tok, dp_rank=0, dp_size=1, seed=1, mode="rollout"
    )
    a, b = inline.next_batch(8), workers.next_batch(8)
    workers.close()
    assert _ids(a) == _ids(b)
    assert sorted(_ids(a[:4])) == sorted(_ids(a[4:])) == sorted(s.id for s in good)
    assert _ids(a[:4]) != _ids(a[4:])  # reshuffled each epoch
    for x, y in zip(a, b):
        assert x.prompt.input_ids.tolist() == y.prompt.input_ids.tolist()
        assert x.video.pixel_values_videos.equal(y.video.pixel_values_videos)
        assert x.input_ids is None and x.labels is None
    other_seed = build_loader(
        good, DataConfig(num_workers=0, **CFG), tok, dp_rank=0, dp_size=1, seed=2, mode="rollout"
    )
    assert _ids(other_seed.next_batch(8)) != _ids(a)


def test_sft_items_carry_masked_targets(data):
    good, _, tok = data
    loader = build_loader(
        good, DataConfig(num_workers=0, **CFG), tok, dp_rank=0, dp_size=1, seed=1, mode="sft"
    )
    item = next(loader)
    n = len(item.prompt.input_ids)
    assert item.input_ids[:n].tolist() == item.prompt.input_ids.tolist()
    assert (item.labels[:n] == IGNORE_INDEX).all()
    target = render_response(item.sample.subjects, item.sample.caption)
    assert tok.decode(item.labels[n:].tolist()) == target + "<|im_end|>"


def test_skip_policy_counts_and_logs_every_bad_sample(data, caplog):
    _, with_bad, tok = data
    loader = build_loader(
        with_bad,
        DataConfig(num_workers=1, on_error="skip", **CFG),
        tok,
        dp_rank=0,
        dp_size=1,
        seed=3,
        mode="rollout",
    )
    with caplog.at_level(logging.WARNING, logger="megatron_vcap.data.loader"):
        items = loader.next_batch(8)  # two epochs of the 4 good samples
    loader.close()
    assert "gone" not in _ids(items) and "junk" not in _ids(items)
    m = loader.metrics()
    assert m["data/skipped/missing_file"] == 2 and m["data/skipped/unreadable"] == 2
    assert m["data/skipped"] == 4 and m["data/consumed"] == 12 and m["data/epoch"] == 2.0
    logged = [r.getMessage() for r in caplog.records]
    assert sum("sample 'gone' (manifest line 2)" in x for x in logged) == 2
    assert sum("sample 'junk' (manifest line 4)" in x for x in logged) == 2


def test_stop_policy_names_the_sample(data):
    _, with_bad, tok = data
    loader = build_loader(
        with_bad,
        DataConfig(num_workers=0, on_error="stop", shuffle=False, **CFG),
        tok,
        dp_rank=0,
        dp_size=1,
        seed=3,
        mode="rollout",
    )
    assert next(loader).sample.line == 1
    with pytest.raises(DataLoadError, match=r"sample 'gone' \(manifest line 2\).*missing_file"):
        next(loader)


def test_too_long_prompts_and_all_bad(data):
    good, with_bad, tok = data
    loader = build_loader(
        good,
        DataConfig(num_workers=0, max_prompt_tokens=10, **CFG),
        tok,
        dp_rank=0,
        dp_size=1,
        seed=3,
        mode="rollout",
    )
    with pytest.raises(DataLoadError, match="in a row failed.*too_long"):
        next(loader)
    assert loader.metrics()["data/skipped/too_long"] == 4


def test_state_from_another_layout_is_rejected(data):
    good, _, tok = data
    cfg = DataConfig(num_workers=0, **CFG)
    saved = build_loader(good, cfg, tok, dp_rank=0, dp_size=1, seed=3, mode="rollout")
    saved.next_batch(2)
    state = saved.state_dict()
    other = build_loader(good, cfg, tok, dp_rank=0, dp_size=1, seed=4, mode="rollout")
    with pytest.raises(ValueError, match="saved seed=3, this run has 4"):
        other.load_state_dict(state)
    fewer = build_loader(good[:3], cfg, tok, dp_rank=0, dp_size=1, seed=3, mode="rollout")
    with pytest.raises(ValueError, match="num_samples"):
        fewer.load_state_dict(state)
    same = build_loader(good, cfg, tok, dp_rank=0, dp_size=1, seed=3, mode="rollout")
    same.load_state_dict(state)
    assert _ids(same.next_batch(2)) == _ids(saved.next_batch(2))
