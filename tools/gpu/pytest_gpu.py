"""Kit section ``pytest``: ``pytest -m gpu tests/gpu``, with every skip and its reason.

Without CUDA (the dry run) every test skips ("needs a CUDA GPU"); without Transformer Engine the
TE tests skip with pytest's importorskip reason. The bf16 trainer tests are deselected by
default because section ``train_step`` runs the same ``vcap train`` launches with figures
(``VCAP_KIT_PYTEST_ALL=1`` keeps them). Passes when nothing fails or errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tools.gpu.common import SectionContext, SectionResult

REPO = Path(__file__).resolve().parents[2]
COVERED_BY_TRAIN_STEP = "tests/gpu/test_trainer_gpu.py::test_bf16_te_training_steps"


def read_junit(path: Path) -> list[dict]:
    """One dict per test case: name, outcome (passed / failed / error / skipped), message."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "").strip()[:300]
                break
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        cases.append({"test": name, "outcome": outcome, "message": message})
    return cases


def run(ctx: SectionContext) -> SectionResult:
    res = SectionResult()
    junit = ctx.work_dir / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rs",
           "-p", "no:cacheprovider", f"--junitxml={junit}"]  # fmt: skip
    if os.environ.get("VCAP_KIT_PYTEST_ALL") != "1":
        cmd += ["--deselect", COVERED_BY_TRAIN_STEP]
        res.notes.append(f"deselected {COVERED_BY_TRAIN_STEP}: section train_step runs it")
    timeout = max(5.0, ctx.time_left() - 5)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n", flush=True)
    if not junit.is_file():
        res.check("pytest ran", False, f"exit {proc.returncode}, no junit report")
        return res
    cases = read_junit(junit)
    counts = {k: sum(c["outcome"] == k for c in cases)
              for k in ("passed", "failed", "error", "skipped")}  # fmt: skip
    res.figures.update(counts, exit_code=proc.returncode, cases=cases)
    res.check("collected tests", len(cases) > 0, value=len(cases))
    res.check("no failures or errors", counts["failed"] + counts["error"] == 0,
              value=counts["failed"] + counts["error"])  # fmt: skip
    # pytest exits 0 (all passed/skipped) or 1 (failures); anything else is a collection error.
    res.check("pytest exit code", proc.returncode == 0, value=proc.returncode)
    return res
