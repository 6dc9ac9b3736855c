"""Synthetic data: real MP4s, faithful ground truth, and a loadable Qwen-style tokenizer.

Faithfulness is checked on the decoded video, not on the generator's own bookkeeping: pixels of
a subject's colour are located in decoded frames and their motion / area / presence compared
with what the caption says.
"""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from megatron_vcap.data.manifest import load_manifest
from megatron_vcap.data.synth import (
    COLORS,
    Action,
    Scene,
    SceneSubject,
    describe_scene,
    make_synthetic_dataset,
    render_frame,
)
from megatron_vcap.data.video_io import read_video_frames, write_mp4
from megatron_vcap.structure import render_response


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return make_synthetic_dataset(root, 4, seed=7, fps=8.0, seconds=3.0, eval_fraction=0.25)


def test_dataset_layout_and_manifest(dataset):
    samples = load_manifest(dataset.manifest)
    assert [s.id for s in samples] == [f"synth_{i:05d}" for i in range(4)]
    assert len(load_manifest(dataset.train_manifest)) == 3
    assert len(load_manifest(dataset.eval_manifest)) == 1
    # Paths are stored relative to the manifest, so the folder can be moved.
    first = json.loads(dataset.manifest.read_text().splitlines()[0])
    assert first["video"] == "videos/synth_00000.mp4"
    for s in samples:
        assert s.caption and s.subjects and s.events
        for subj in s.subjects:
            assert subj.description.startswith("a ") and len(subj.attributes) == 3
            assert subj.actions
        # Every action of every subject is one event, and the caption names every subject.
        assert len(s.events) == sum(len(subj.actions) for subj in s.subjects)
        for subj in s.subjects:
            color, size = subj.attributes[0], subj.attributes[1]
            assert f"{size} {color}" in s.caption
        with av.open(s.video) as c:
            stream = c.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert (stream.codec_context.width, stream.codec_context.height) == (160, 120)
            assert float(stream.average_rate) == 8.0
            assert sum(1 for _ in c.decode(stream)) == 24


def test_same_seed_same_data(dataset, tmp_path):
    again = make_synthetic_dataset(tmp_path, 2, seed=7, fps=8.0, seconds=3.0, write_tokenizer=False)
    a = dataset.manifest.read_text().splitlines()[:2]
    b = again.manifest.read_text().splitlines()
    assert a == b
    other = make_synthetic_dataset(
        tmp_path / "o", 2, seed=8, fps=8.0, seconds=3.0, write_tokenizer=False
    )
    assert other.manifest.read_text().splitlines() != b


def _color_mask(frame: np.ndarray, color: str, tol: int = 40) -> np.ndarray:
    ref = np.array(COLORS[color], np.int16)
    return np.abs(frame.astype(np.int16) - ref).sum(-1) < tol


def _decoded(scene: Scene, tmp_path, name: str, fps: float = 8.0) -> np.ndarray:
    n = int(scene.seconds * fps)
    path = write_mp4(
        tmp_path / f"{name}.mp4",
        (render_frame(scene, k / fps) for k in range(n)),
        fps=fps,
        width=scene.width,
        height=scene.height,
    )
    frames, _, _ = read_video_frames(path, lambda meta: list(range(meta.num_frames)))
    return frames


def test_rendered_actions_match_their_descriptions(tmp_path):
    w, h, secs = 160, 120, 2.0
    mover = SceneSubject(
        "circle", "red", "medium", "solid", 40, 60, [Action("move", 0, secs, direction="right")]
    )
    grower = SceneSubject("square", "blue", "small", "solid", 40, 60, [Action("grow", 0, secs)])
    vanisher = SceneSubject(
        "diamond", "yellow", "small", "solid", 80, 60, [Action("disappear", 0, secs)]
    )
    turner = SceneSubject(
        "square",
        "green",
        "small",
        "solid",
        80,
        60,
        [Action("change_color", 0, secs, new_color="purple")],
    )
    frames = _decoded(Scene(w, h, secs, "light gray", [mover]), tmp_path, "move")
    xs = [np.nonzero(_color_mask(f, "red"))[1].mean() for f in (frames[0], frames[-1])]
    assert xs[1] - xs[0] > 0.25 * w  # moved right by about MOVE_FRACTION of the width

    frames = _decoded(Scene(w, h, secs, "light gray", [grower]), tmp_path, "grow")
    areas = [_color_mask(f, "blue").sum() for f in (frames[0], frames[-1])]
    assert areas[1] > 2 * areas[0]

    frames = _decoded(Scene(w, h, secs, "dark gray", [vanisher]), tmp_path, "vanish")
    assert _color_mask(frames[0], "yellow").sum() > 50
    assert _color_mask(frames[-1], "yellow").sum() == 0

    frames = _decoded(Scene(w, h, secs, "beige", [turner]), tmp_path, "turn")
    assert (
        _color_mask(frames[0], "green").sum() > 50 and _color_mask(frames[0], "purple").sum() == 0
    )
    assert (
        _color_mask(frames[-1], "purple").sum() > 50 and _color_mask(frames[-1], "green").sum() == 0
    )

    caption, structure, events = describe_scene(Scene(w, h, secs, "beige", [mover, turner]))
    assert caption == (
        "The video shows two shapes on a beige background. A medium red circle moves to the "
        "right. A small green square turns purple."
    )
    assert structure[0].description == "a medium red circle"
    assert structure[0].attributes == ["red", "medium", "plain"]
    assert structure[1].actions == ["turns purple"]
    assert events == [
        "The medium red circle moves to the right.",
        "The small green square turns purple.",
    ]


def test_tokenizer_loads_with_autotokenizer_and_is_compact(dataset):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(dataset.tokenizer_dir))
    assert 300 <= len(tok) <= 1000
    for name in (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|video_pad|>",
        "<|image_pad|>",
    ):
        token_id = tok.convert_tokens_to_ids(name)
        assert tok.convert_ids_to_tokens(token_id) == name
        assert tok(name, add_special_tokens=False)["input_ids"] == [token_id]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    sample = load_manifest(dataset.manifest)[0]
    text = render_response(sample.subjects, sample.caption)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: lossless
    assert len(ids) < len(text) / 3  # trained on this domain, so it is compact
    unseen = "Zebra überquert 42 Straßen!"
    assert tok.decode(tok(unseen, add_special_tokens=False)["input_ids"]) == unseen
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_process_pool_writes_the_same_dataset(tmp_path):
    """``workers=2`` (a spawn pool, engaged from 32 videos) gives the same manifest and the same
    decoded frames as one process (the files' bytes differ in the MP4 creation time)."""
    kw = dict(width=32, height=32, fps=4.0, seconds=1.0, write_tokenizer=False)
    one = make_synthetic_dataset(tmp_path / "one", 32, seed=5, workers=1, **kw)
    two = make_synthetic_dataset(tmp_path / "two", 32, seed=5, workers=2, **kw)
    lines_one = one.manifest.read_text().replace(str(tmp_path / "one"), "ROOT")
    lines_two = two.manifest.read_text().replace(str(tmp_path / "two"), "ROOT")
    assert lines_one == lines_two
    assert len(lines_one.splitlines()) == 32
    for video in sorted(one.videos_dir.iterdir()):
        a, b = _all_frames(video), _all_frames(two.videos_dir / video.name)
        assert a.shape == b.shape and np.array_equal(a, b), video.name


def _all_frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])
