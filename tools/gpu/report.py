"""report.json and report.md of a GPU kit run.

``report.json``: ``{"kit": ..., "dry_run", "passed", "wall_s", "env": {...}, "sections": {name:
{"status", "passed", "seconds", "figures", "checks", "targets", "notes", "error"}}}``. A section's
``status`` is ``pass``, ``fail`` (a check failed), ``error`` (it raised or crashed), ``timeout``
(killed at its time limit; figures saved before that are kept) or ``skipped`` (no time left).
``report.md`` is the same for people: one table of sections, then each section's checks,
targets and top-level figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REQUIRED_SECTIONS = ("parity", "train_step", "mfu", "decode", "rollout")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(
            f"{k} {_fmt(v)}" for k, v in value.items() if not isinstance(v, (list, dict))
        )
    return str(value)


def render_markdown(report: dict) -> str:
    env = report.get("env", {})
    lines = [
        f"# GPU kit report ({'dry run, CPU' if report['dry_run'] else 'GPU'})",
        "",
        f"passed: **{_fmt(report['passed'])}**, wall {report['wall_s']:.0f} s, "
        f"device {env.get('device', '?')}, torch {env.get('torch', '?')}, "
        f"megatron-core {env.get('megatron-core', '?')}, transformers "
        f"{env.get('transformers', '?')}, Transformer Engine {env.get('transformer_engine', '?')}",
        "",
        "| section | status | seconds | CPU seconds | checks passed |",
        "|---|---|---|---|---|",
    ]
    for name, sec in report["sections"].items():
        checks = sec.get("checks", [])
        ok = sum(c["passed"] for c in checks)
        cpu = "" if sec.get("cpu_s") is None else f"{sec['cpu_s']:.0f}"
        lines.append(
            f"| {name} | {sec['status']} | {sec.get('seconds', 0):.0f} | {cpu} | {ok}/{len(checks)} |"
        )
    for name, sec in report["sections"].items():
        lines += ["", f"## {name}: {sec['status']}"]
        if sec.get("error"):
            lines += ["", "```", sec["error"][-2000:], "```"]
        for c in sec.get("checks", []):
            mark = "PASS" if c["passed"] else "FAIL"
            value = f" = {_fmt(c['value'])}" if "value" in c else ""
            lines.append(f"- {mark} {c['name']}{value} {c.get('detail', '')}".rstrip())
        for t in sec.get("targets", []):
            mark = "met" if t["met"] else "NOT met"
            lines.append(f"- target {t['name']} = {_fmt(t['value'])} (goal {t['goal']}): {mark}")
        for key, value in sec.get("figures", {}).items():
            if isinstance(value, list):
                continue
            lines.append(f"- {key}: {_fmt(value)}")
        for note in sec.get("notes", []):
            lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    md_path = out_dir / "report.md"
    md_path.write_text(render_markdown(report))
    return json_path, md_path
