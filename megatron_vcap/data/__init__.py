"""Video data pipeline: decoding, frame sampling, Qwen-VL preprocessing, manifests, loader.

Public entry points (imported lazily so that ``vcap --help`` does not pay for torch):
``process_video`` / ``process_image`` (``vision.py``), ``load_manifest`` / ``Sample``
(``manifest.py``), ``build_prompt`` / ``build_sft_example`` (``prompts.py``), ``build_loader``
(``loader.py``) and ``make_synthetic_dataset`` (``synth.py``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "process_video": "vision",
    "process_image": "vision",
    "VideoInputs": "vision",
    "ImageInputs": "vision",
    "VideoDataError": "video_io",
    "Sample": "manifest",
    "load_manifest": "manifest",
    "write_manifest": "manifest",
    "build_prompt": "prompts",
    "build_sft_example": "prompts",
    "build_loader": "loader",
    "make_synthetic_dataset": "synth",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'megatron_vcap.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"megatron_vcap.data.{module}"), name)
