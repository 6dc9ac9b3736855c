"""The GPU kit's fixtures: tiny synthetic videos, a manifest, a tiny model directory.

Written by ``prepare.sh`` on the machine that has PyAV (the GPU machine may not), carried in
``.gpu_kit/fixtures/``, and rebuilt by the kit only if they are missing. Video paths in the
manifest are relative to it, so the folder works wherever it is unpacked. ``fixtures.json``
records what was written; its presence marks a complete set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

STAMP = "fixtures.json"
# GRPO needs prompts_per_step (2) distinct videos per step, SFT global_batch_size (4).
NUM_VIDEOS = 8
VIDEO = dict(width=112, height=84, fps=4.0, seconds=2.0)
MODEL = dict(hidden=128, layers=2)


def fixture_paths(root: Path) -> dict[str, Path]:
    root = Path(root)
    return {
        "root": root,
        "manifest": root / "data" / "manifest.jsonl",
        "model": root / "model",
        "stamp": root / STAMP,
    }


def ensure_fixtures(root: str | Path, *, force: bool = False) -> dict[str, Path]:
    """Write the fixtures under ``root`` unless a complete set is there; returns their paths."""
    paths = fixture_paths(Path(root))
    if paths["stamp"].is_file() and not force:
        return paths
    from megatron_vcap.data.synth import make_synthetic_dataset
    from megatron_vcap.demo.demo import DemoSettings, build_model_dir

    root = paths["root"]
    if root.exists():
        shutil.rmtree(root)
    data = make_synthetic_dataset(root / "data", NUM_VIDEOS, seed=1, **VIDEO)
    build_model_dir(root, data.tokenizer_dir, DemoSettings(**MODEL))
    import transformers

    paths["stamp"].write_text(
        json.dumps(
            {"videos": NUM_VIDEOS, **VIDEO, **MODEL, "transformers": transformers.__version__},
            indent=1,
        )
    )
    return paths


def folder_bytes(path: Path) -> int:
    path = Path(path)
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
