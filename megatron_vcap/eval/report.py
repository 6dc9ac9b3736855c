"""Outputs of a benchmark run: results.json, report.md, records.jsonl, a PNG bar chart; and the
``vcap eval compare`` table.

Files are written to a temporary name and renamed, so a killed run never leaves a half-written
result. Scores are fractions in [0, 1] in results.json and percentages in the tables, as the
leaderboards print them (VDC scores stay on their 0-5 scale).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_records(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _prf_table(title: str, label: str, blocks: dict[str, dict]) -> list[str]:
    lines = [
        f"### {title}",
        "",
        f"| {label} | F1 | Precision | Recall | n |",
        "|---|---|---|---|---|",
    ]
    for name, b in blocks.items():
        if b["n"] == 0:  # a subset without scored samples has no score (and is not averaged)
            lines.append(f"| {name} | - | - | - | 0 |")
            continue
        lines.append(
            f"| {name} | {_pct(b['f1'])} | {_pct(b['precision'])} | {_pct(b['recall'])} | {b['n']} |"
        )
    return [*lines, ""]


def _settings_table(settings: dict) -> list[str]:
    lines = ["### Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in settings.items()]
    return [*lines, ""]


def render_report(bench: str, results: dict) -> str:
    """Markdown tables shaped like the benchmark's leaderboard, then the settings."""
    lines = [f"# {bench} results", ""]
    if bench == "dream1k":
        lines += _prf_table(
            "Overall (macro over subsets)", "model", {"overall": results["overall"]}
        )
        lines += _prf_table("Subsets", "subset", results["subsets"])
        for field_name, table in results["buckets"].items():
            lines += _prf_table(f"By {field_name}", field_name, table)
    elif bench == "carebench":
        for branch in ("action", "object"):
            block = results[branch]
            lines += _prf_table(
                f"{branch.capitalize()}", "", {"overall": block["overall"], **block["categories"]}
            )
    else:
        for mode in results["aggregations"]:
            agg = results["by_aggregation"][mode]
            head = "| type | accuracy | score | n |"
            lines += [f"### VDCscore ({mode} aggregation)", "", head, "|---|---|---|---|"]
            for t, b in agg["types"].items():
                lines.append(f"| {t} | {_pct(b['accuracy'])} | {b['score']:.2f} | {b['n']} |")
            avg = agg["average"]
            lines += [f"| **average** | {_pct(avg['accuracy'])} | {avg['score']:.2f} | |", ""]
    lines += [f"Failed samples (dropped, not scored 0): {results['failed']}; samples without a "
              f"caption (skipped): {results.get('missing', 0)}", ""]  # fmt: skip
    lines += _settings_table(results["settings"])
    return "\n".join(lines)


def plot_chart(bench: str, results: dict, path: Path) -> None:
    """One bar per subset (DREAM-1K), category and branch (CAREBENCH) or caption type (VDC)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if bench == "dream1k":
        bars = {k: v["f1"] for k, v in results["subsets"].items() if v["n"]}
        bars["overall"] = results["overall"]["f1"]
        ylabel = "event F1 (%)"
    elif bench == "carebench":
        bars = {}
        for branch in ("action", "object"):
            bars[f"{branch}: overall"] = results[branch]["overall"]["f1"]
            bars.update(
                {f"{branch}: {c}": b["f1"] for c, b in results[branch]["categories"].items()}
            )
        ylabel = "F1 (%)"
    else:
        bars = {k: v["accuracy"] for k, v in results["types"].items() if v["n"]}
        bars["average"] = results["average"]["accuracy"]
        ylabel = f"accuracy (%), {results['aggregation']} aggregation"
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(bars) + 2), 4))
    ax.bar(list(bars), [100 * v for v in bars.values()], color="#4c72b0")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{bench}: {results['settings'].get('model', '')}"[:90])
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, bench: str, results: dict, records: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_records(out / "records.jsonl", records)
    write_atomic(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False))
    write_atomic(out / "report.md", render_report(bench, results))
    plot_chart(bench, results, out / f"{bench}.png")


# ------------------------------------------------------------------------------ compare
COLUMNS = (
    ("DREAM F1", "dream1k", lambda r: r["overall"]["f1"]),
    ("VDC acc", "vdc", lambda r: r["average"]["accuracy"]),
    ("CARE action F1", "carebench", lambda r: r["action"]["overall"]["f1"]),
    ("CARE object F1", "carebench", lambda r: r["object"]["overall"]["f1"]),
)


def _load_run(path: Path) -> dict[str, Any]:
    """Benchmark -> results of a run directory: its own results.json, or one per sub-folder."""
    from megatron_vcap.config.loader import ConfigError

    files = [path / "results.json"] if (path / "results.json").is_file() else []
    files += sorted(path.glob("*/results.json"))
    if not files:
        raise ConfigError(f"vcap eval compare: {path} holds no results.json (nor */results.json)")
    found = {}
    for f in files:
        try:
            res = json.loads(f.read_text())
            found[res["benchmark"]] = res
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{f}: not a results.json of vcap eval ({exc})") from None
    return found


def compare_table(dirs: list[str]) -> str:
    """Rows: runs; columns: DREAM F1, VDC accuracy, CARE action / object F1 (percent), each
    with its delta against the first run."""
    runs = [(d, _load_run(Path(d))) for d in dirs]
    base = runs[0][1]
    header = f"{'run':<32}" + "".join(f"{name:>22}" for name, _, _ in COLUMNS)
    lines = [header, "-" * len(header)]
    for i, (name, res) in enumerate(runs):
        cells = []
        for _, bench, get in COLUMNS:
            if bench not in res:
                cells.append(f"{'-':>22}")
                continue
            value = 100 * get(res[bench])
            cell = f"{value:.1f}"
            if i > 0 and bench in base:
                cell += f" ({value - 100 * get(base[bench]):+.1f})"
            cells.append(f"{cell:>22}")
        lines.append(f"{Path(name).name or name:<32}"[:32] + "".join(cells))
    lines.append(
        "(percent; deltas against the first run; comparable only under the same judge and frame settings)"
    )
    return "\n".join(lines)
