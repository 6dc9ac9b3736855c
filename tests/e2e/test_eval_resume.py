"""Kill ``vcap eval dream1k`` (SIGKILL) while it is judging, rerun the same command: the results
equal an uninterrupted run's, and no prompt the judge had already answered is asked again
(counted on the loopback server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from megatron_vcap.cli import main as vcap_main
from megatron_vcap.testing.fake_openai import FakeOpenAIServer
from tests.unit.evalkit import judge_flags
from tests.unit.test_eval_scoring import dream_fixture

SCORES = ("overall", "subsets", "buckets", "failed", "num_samples", "missing")


def _prompts(server) -> list[str]:
    return [json.dumps(b["messages"], sort_keys=True) for b in server.bodies]


def test_kill_during_judging_then_rerun(tmp_path):
    ann, preds, judge = dream_fixture(tmp_path)
    judge.extract["cat four"] = ["p4a"]  # every answer usable: nothing is legitimately re-asked
    judge.verdicts["p4a"] = "entailment"
    base = ["eval", "dream1k", "--annotations", str(ann), "--predictions", str(preds)]

    with FakeOpenAIServer(require_schema=False, answer=judge) as server:
        assert vcap_main([*base, *judge_flags(server, tmp_path / "clean")]) == 0
        clean_prompts = _prompts(server)
    clean = json.loads((tmp_path / "clean" / "results.json").read_text())

    out = tmp_path / "killed"
    with FakeOpenAIServer(require_schema=False, answer=judge, latency_s=0.3) as server:
        flags = judge_flags(server, out, judge_concurrency=1)
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        proc = subprocess.Popen([sys.executable, "-m", "megatron_vcap", *base, *flags], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 300
        while server.stats["requests"] < 5 and proc.poll() is None:
            assert time.monotonic() < deadline, "the run never reached the judge"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        first = _prompts(server)
    assert 5 <= len(first) < len(clean_prompts)
    assert not (out / "results.json").exists()

    with FakeOpenAIServer(require_schema=False, answer=judge) as server:
        assert vcap_main([*base, *judge_flags(server, out)]) == 0
        second = _prompts(server)
    again = json.loads((out / "results.json").read_text())
    assert {k: again[k] for k in SCORES} == {k: clean[k] for k in SCORES}
    # Only the request in flight at the kill (concurrency 1) may be asked twice.
    repeated = set(first) & set(second)
    assert repeated <= {first[-1]}
    assert len(second) == len(clean_prompts) - len(first) + len(repeated)
    assert again["judge_stats"].get("cache_hits", 0) == len(first) - len(repeated)
