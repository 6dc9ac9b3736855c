"""Prompts against the transformers Qwen2-VL / Qwen2.5-VL processors (the oracle).

The processors are built around the synthetic dataset's tokenizer; given the same rendered chat
text and the same decoded frames they expand ``<|video_pad|>`` themselves, so their input_ids,
grid and ``second_per_grid_ts`` must equal ours.
"""

from __future__ import annotations

import pytest
import torch

from megatron_vcap.data.manifest import load_manifest
from megatron_vcap.data.prompts import (
    IGNORE_INDEX,
    STRUCTURED_THINKING_INSTRUCTION,
    build_prompt,
    build_sft_example,
    render_chat,
    video_messages,
)
from megatron_vcap.data.synth import make_synthetic_dataset
from megatron_vcap.data.video_io import read_video_frames
from megatron_vcap.data.vision import process_video
from megatron_vcap.structure import render_response

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402

PIXELS = dict(min_pixels=28 * 28 * 4, max_pixels=160 * 120)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    paths = make_synthetic_dataset(root, 2, seed=3, fps=10.0, seconds=3.0)
    tok = AutoTokenizer.from_pretrained(str(paths.tokenizer_dir))
    return load_manifest(paths.manifest), tok


def _hf_processor(cls_name: str, tok):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    cls = getattr(transformers, cls_name)
    return cls(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**PIXELS),
        chat_template=tok.chat_template,
    )


@pytest.mark.parametrize("cls_name", ["Qwen2VLProcessor", "Qwen2_5_VLProcessor"])
def test_prompt_matches_qwen_processor(data, cls_name):
    samples, tok = data
    # 3 s at 10 fps, 6 frames at most: sampled fps 2.0 would hide a wrong default (DESIGN §3).
    video = process_video(samples[0].video, fps=4.0, max_frames=6, **PIXELS)
    assert video.num_frames == 6 and video.sampled_fps == pytest.approx(6 / 30 * 10)
    frames, _, _ = read_video_frames(samples[0].video, lambda meta: video.frame_indices)
    text = render_chat(tok, video_messages(STRUCTURED_THINKING_INSTRUCTION))
    proc = _hf_processor(cls_name, tok)
    ref = proc(
        text=[text],
        videos=[frames],
        videos_kwargs=dict(
            do_sample_frames=False,
            video_metadata=[{"fps": video.sampled_fps, "total_num_frames": len(frames)}],
            cap_pixels_per_frame=False,
        ),
        return_tensors="pt",
    )
    ours = build_prompt(tok, video)
    assert ours.input_ids.dtype == torch.long
    assert ours.input_ids.tolist() == ref["input_ids"][0].tolist()
    assert video.video_grid_thw.tolist() == ref["video_grid_thw"].tolist()
    torch.testing.assert_close(
        video.pixel_values_videos, ref["pixel_values_videos"], atol=1e-5, rtol=0
    )
    pad = tok.convert_tokens_to_ids("<|video_pad|>")
    assert ours.num_video_tokens == int((ours.input_ids == pad).sum())
    assert ours.num_video_tokens == int(video.video_grid_thw.prod()) // 4
    if cls_name == "Qwen2_5_VLProcessor":
        assert float(ref["second_per_grid_ts"][0]) == pytest.approx(video.second_per_grid_ts)
        assert video.second_per_grid_ts == pytest.approx(2 / 2.0)  # 2 / (6 frames / 3 s)
    tail = tok.decode(ours.input_ids[-5:].tolist())
    assert tail.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert STRUCTURED_THINKING_INSTRUCTION in tok.decode(ours.input_ids.tolist())


def test_sft_example_masks_the_prompt(data):
    samples, tok = data
    video = process_video(samples[1].video, **PIXELS)
    target = render_response(samples[1].subjects, samples[1].caption)
    input_ids, labels = build_sft_example(tok, video, target)
    prompt = build_prompt(tok, video)
    n = len(prompt.input_ids)
    assert input_ids.shape == labels.shape and input_ids[:n].tolist() == prompt.input_ids.tolist()
    assert (labels[:n] == IGNORE_INDEX).all() and (labels[n:] != IGNORE_INDEX).all()
    assert labels[n:].tolist() == input_ids[n:].tolist()
    assert tok.decode(labels[n:].tolist()) == target + "<|im_end|>"
    # The full conversation rendered by the chat template tokenizes to the same ids.
    full = tok.apply_chat_template(
        video_messages(STRUCTURED_THINKING_INSTRUCTION)
        + [{"role": "assistant", "content": target}],
        tokenize=False,
    )
    full_ids = tok(full, add_special_tokens=False)["input_ids"]
    pad = tok.convert_tokens_to_ids("<|video_pad|>")
    p = full_ids.index(pad)
    full_ids = full_ids[:p] + [pad] * prompt.num_video_tokens + full_ids[p + 1 :]
    assert full_ids[: len(input_ids)] == input_ids.tolist()


def test_template_fallback_and_missing_special_tokens(data):
    samples, tok = data
    video = process_video(samples[0].video, **PIXELS)
    reference = build_prompt(tok, video).input_ids
    # A tokenizer whose template ignores vision items (text-only Qwen) falls back to Qwen's.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] if m['content'] is "
        "string else '' }}<|im_end|>\n{% endfor %}"
    )
    try:
        assert build_prompt(tok, video).input_ids.tolist() == reference.tolist()
    finally:
        tok.chat_template = None
    assert build_prompt(tok, video).input_ids.tolist() == reference.tolist()

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bare = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=bare, unk_token="[UNK]")
    with pytest.raises(ValueError, match=r"no special token <\|endoftext\|>"):
        build_prompt(plain, video)
