"""The GPU kit's dry run, end to end: ``bash tools/gpu/run.sh --dry-run`` on CPU (tiny shapes).

Runs every section exactly as on a GPU machine (fixtures written here, ``pytest -m gpu``
collected and skipped, bf16/fp32 parity against transformers, one GRPO and one SFT step through
``torchrun -m megatron_vcap train`` with the HF round trip, MFU, decode and rollout benchmarks)
and checks the report the device would send back: every section present and passed, with its
figures, and ``$OUT`` within the device's limits (at most 8 files, no sub-folders needed).
Timings are recorded, never checked. About 1.5 minutes on an idle 2-core machine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("pytest", "parity", "train_step", "mfu", "decode", "rollout")


def test_gpu_kit_dry_run_writes_a_passing_report(tmp_path):
    out, kit = tmp_path / "out", tmp_path / "kit"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = ["bash", "tools/gpu/run.sh", "--dry-run", "--out", str(out), "--kit-dir", str(kit),
           "--work-dir", str(tmp_path / "work")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)
    report = json.loads((out / "report.json").read_text())
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert report["dry_run"] and report["passed"]
    assert sorted(p.name for p in out.iterdir()) == ["kit.log", "report.json", "report.md"]
    assert report["env"]["torch"] and report["fixtures"]["status"] == "pass"
    assert (kit / "fixtures" / "fixtures.json").is_file()  # the kit wrote the missing fixtures
    md = (out / "report.md").read_text()
    for name in SECTIONS:
        sec = report["sections"][name]
        assert sec["status"] == "pass" and sec["passed"], (name, sec.get("error"))
        assert sec["checks"] and all(c["passed"] for c in sec["checks"]), name
        assert sec["figures"], name
        assert f"## {name}: pass" in md

    fig = {name: report["sections"][name]["figures"] for name in SECTIONS}
    assert fig["pytest"]["failed"] == fig["pytest"]["error"] == 0 and fig["pytest"]["skipped"] > 0
    assert all(c["message"] for c in fig["pytest"]["cases"] if c["outcome"] == "skipped")
    for dtype in ("fp32", "bf16"):
        assert math.isfinite(fig["parity"][f"ours_{dtype}_vs_fp32"]["max_abs"])
    for mode in ("grpo", "sft"):
        assert math.isfinite(fig["train_step"][mode]["loss"])
        assert fig["train_step"][mode]["hf_round_trip_max_abs"] >= 0
    mfu = fig["mfu"]
    assert mfu["flops_per_step"] == mfu["lm_flops"] + mfu["vision_flops"] > 0
    assert math.isfinite(mfu["mfu_vs_measured_matmul"])
    assert {"batch_1", "batch_2", "batch_4"} <= set(fig["decode"])
    assert all(math.isfinite(fig["decode"][b]["bound_ms_measured_bw"])
               for b in ("batch_1", "batch_2", "batch_4"))  # fmt: skip
    targets = {t["name"] for t in report["sections"]["rollout"]["targets"]}
    assert "group-prefix speedup at G=8 (whole generation)" in targets
    assert report["sections"]["decode"]["targets"]  # the step / HBM bound ratio, reported
