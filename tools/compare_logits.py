"""Compare a converted Megatron checkpoint's logits with the Hugging Face model's (run it after
every conversion).

    python tools/compare_logits.py --hf HF_DIR --ckpt CKPT_DIR --prompt "Describe the video." \\
        [--video FILE --fps 2 | --image FILE] [--tp N] [--tol 1e-4]

Both models see identical inputs, prepared by the HF processor from HF_DIR (chat template,
image / video preprocessing; a video is sampled at --fps and its real frame rate is passed on, so
Qwen2.5-VL's absolute-time positions are exercised). The HF model runs in fp32 with eager
attention; ours is built from the checkpoint's config at --tp tensor-parallel CPU ranks (gloo) in
fp32 with local layers. Prints the max and mean absolute logit difference over the prompt's
tokens and exits 1 when the max exceeds --tol.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, help="Hugging Face model directory")
    p.add_argument("--ckpt", required=True, help="Megatron checkpoint directory (with hf/)")
    p.add_argument("--prompt", required=True, help="the user's text")
    media = p.add_mutually_exclusive_group()
    media.add_argument("--video", help="video file")
    media.add_argument("--image", help="image file")
    p.add_argument("--fps", type=float, default=2.0, help="video sampling rate (frames/s)")
    p.add_argument("--max-frames", type=int, default=32, help="most video frames to sample")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks for our model")
    p.add_argument("--tol", type=float, default=1e-4, help="largest allowed max abs difference")
    args = p.parse_args(argv)
    if args.fps <= 0:
        p.error("--fps: must be > 0")
    return args


def load_video(path: str, fps: float, max_frames: int):
    """Frames sampled uniformly at ``fps`` and the rate they were actually sampled at."""
    from megatron_vcap.data.video_io import read_video_frames
    from megatron_vcap.data.vision import compute_num_frames, sample_frame_indices

    def choose(meta):
        n = compute_num_frames(
            meta.num_frames, meta.fps, fps=fps, min_frames=2, max_frames=max_frames
        )
        return sample_frame_indices(0, meta.num_frames - 1, n)

    frames, meta, indices = read_video_frames(path, choose)
    return frames, len(indices) * meta.fps / meta.num_frames


def prepare_inputs(args):
    """The HF processor's batch (one sample) for the prompt and the optional image / video."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(args.hf)
    content, kwargs = [], {}
    if args.image:
        content.append({"type": "image"})
        kwargs["images"] = [Image.open(args.image).convert("RGB")]
    if args.video:
        frames, sampled_fps = load_video(args.video, args.fps, args.max_frames)
        content.append({"type": "video"})
        kwargs["videos"] = [frames]
        # Given as fps= the rate would be ignored for pre-sampled frames (24 fps assumed).
        kwargs["videos_kwargs"] = dict(
            video_metadata=[{"fps": sampled_fps, "total_num_frames": len(frames)}],
            do_sample_frames=False,
        )
    content.append({"type": "text", "text": args.prompt})
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], return_tensors="pt", **kwargs)


def hf_logits(hf_dir: str, inputs):
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return model(**inputs).logits


def our_logits(ckpt_dir: str, tp: int, inputs):
    """On each rank: build, load the checkpoint, forward; rank results are the full logits."""
    import torch

    from megatron_vcap.convert.checkpoint import HF_ASSETS_SUBDIR, load_model_checkpoint
    from megatron_vcap.models.config import ModelConfig
    from megatron_vcap.models.hf_config import load_hf_config
    from megatron_vcap.models.mrope import compute_mrope_position_ids
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model
    from megatron_vcap.parallel.config import ParallelConfig
    from megatron_vcap.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp), seed=0)
    hf_config = load_hf_config(Path(ckpt_dir) / HF_ASSETS_SUBDIR)
    model_cfg = ModelConfig(params_dtype="fp32", transformer_impl="local")
    model = build_qwen_vl_model(hf_config, model_cfg, init_weights=False)
    load_model_checkpoint(ckpt_dir, model)
    positions, _ = compute_mrope_position_ids(
        inputs["input_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=inputs.get("attention_mask"),
        hf_config=hf_config,
    )
    with torch.no_grad():
        return model.eval()(
            inputs["input_ids"],
            positions,
            inputs.get("attention_mask"),
            runtime_gather_output=True,
            **{k: inputs[k] for k in VISION_KEYS if k in inputs},
        )


def main(argv=None) -> int:
    from megatron_vcap.parallel.multiprocess import run_on_ranks

    args = parse_args(argv)
    inputs = dict(prepare_inputs(args))
    ref = hf_logits(args.hf, inputs)
    ours = run_on_ranks(our_logits, args.tp, args.ckpt, args.tp, inputs)[0]
    if ours.shape != ref.shape:
        print(f"logit shapes differ: ours {tuple(ours.shape)}, HF {tuple(ref.shape)}")
        return 1
    real = inputs["attention_mask"].bool()
    diff = (ours - ref).abs()[real]
    print(f"tokens: {int(real.sum())}  vocab: {ref.shape[-1]}  TP: {args.tp}")
    print(f"max abs logit diff:  {diff.max().item():.3e}")
    print(f"mean abs logit diff: {diff.mean().item():.3e}")
    ok = diff.max().item() <= args.tol
    print(f"{'OK' if ok else 'FAIL'}: max abs diff {'<=' if ok else '>'} tol {args.tol:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
