"""The GPU kit's runner: every section in its own process, under one time budget, one report.

    python -m tools.gpu.kit --out DIR [--dry-run] [--budget-s S] [--sections a,b] [--kit-dir D]

(``tools/gpu/run.sh`` calls this after installing the carried wheels.) Sections run in order of
:data:`SECTIONS`; each gets its nominal time, more when earlier ones finished early, and is
killed (its whole process group: torchrun children too) at its limit, keeping the figures it
saved so far. A failing section records its error and the rest still run. ``--dry-run`` runs
the same sections on CPU with tiny shapes, by default all in one child process (``--isolate
no``: importing torch, Megatron and transformers once instead of per section halves the dry
run's CPU time; time limits are then checked between sections and the budget is enforced as a
whole). Writes ``report.json``, ``report.md`` and ``kit.log`` (every section's output) to
``--out``; exit status 0 only when every section passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from tools.gpu.common import kill_tree

REPO = Path(__file__).resolve().parents[2]
LOG_CAP_BYTES = 2 * 2**20  # per section in kit.log: the device returns files up to 16 MiB


@dataclass(frozen=True)
class Section:
    name: str
    module: str
    gpu_s: float  # nominal time on the GPU machine
    dry_s: float  # nominal time in the CPU dry run


SECTIONS = (
    Section("pytest", "tools.gpu.pytest_gpu", 45, 120),
    Section("parity", "tools.gpu.parity", 40, 120),
    Section("train_step", "tools.gpu.train_step", 90, 300),
    Section("mfu", "tools.gpu.mfu", 80, 120),
    Section("decode", "tools.gpu.decode", 75, 120),
    Section("rollout", "tools.gpu.rollout", 75, 120),
)
# GPU: 8 minutes for run.sh in all (the wheels install first). Dry run: generous, since a
# loaded CI machine must not fail the test on time; it takes about 2 minutes on an idle one.
DEFAULT_BUDGET_S = {"gpu": 420, "dry": 900}
HELPERS = {"env": "tools.gpu.env_info", "fixtures": "tools.gpu.fixtures_step"}
HELPER_S = 120  # limit of each helper step
MIN_SECTION_S = 10  # a section with less time than this is skipped


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_kit_out")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    p.add_argument("--kit-dir", default=str(REPO / ".gpu_kit"), help="wheels/ and fixtures/")
    p.add_argument("--work-dir", default="", help="scratch space (default: a temporary folder)")
    p.add_argument("--budget-s", type=float, default=0, help="default 420 on GPU, 900 dry")
    p.add_argument("--sections", default="", help="comma-separated subset, in kit order")
    p.add_argument(
        "--isolate",
        choices=("auto", "yes", "no"),
        default="auto",
        help="one process per section (auto: yes on GPU, no in the dry run)",
    )
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- child side ------------------------------------------------------------------------------


def _cpu_s() -> float:
    """CPU seconds of this process and its waited-for descendants (torchrun workers too)."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def run_step(module_name: str, raw_ctx: dict) -> dict:
    """Run one section (or helper) and write its result JSON, also when it fails."""
    import importlib

    from tools.gpu.common import SectionContext

    ctx = SectionContext(
        **{k: Path(v) if k.endswith(("_dir", "_path")) else v for k, v in raw_ctx.items()}
    )
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    (ctx.work_dir / "started").touch()
    print(f"\n===== {ctx.name} =====", flush=True)
    start, cpu_start = time.time(), _cpu_s()
    try:
        res = importlib.import_module(module_name).run(ctx)
        out = res.to_dict()
    except BaseException:  # noqa: BLE001 (any failure becomes the section's error)
        path = ctx.result_path
        partial = json.loads(path.read_text()) if path.is_file() else {}
        out = {**partial, "passed": False, "error": traceback.format_exc()}
        print(out["error"], file=sys.stderr, flush=True)
    out.update(seconds=round(time.time() - start, 1), cpu_s=round(_cpu_s() - cpu_start, 1),
               finished=True)  # fmt: skip
    ctx.result_path.write_text(json.dumps(out, default=str))
    return out


def child_main(plan_path: str) -> int:
    """Run the planned steps in order; each one's deadline is set when it starts."""
    plan = json.loads(Path(plan_path).read_text())
    table = {s.name: s for s in SECTIONS}
    names = [step["ctx"]["name"] for step in plan["steps"] if step["ctx"]["name"] in table]
    for step in plan["steps"]:
        ctx, name = dict(step["ctx"]), step["ctx"]["name"]
        remaining = plan["deadline"] - time.time()
        if name in table:
            limit = plan_timeout(names.index(name), names, table, remaining, ctx["dry_run"])
        else:
            limit = min(HELPER_S, remaining - 5)
        if limit < MIN_SECTION_S:
            continue  # the parent records it as skipped
        ctx["deadline"] = time.time() + limit
        run_step(step["module"], ctx)
    return 0


# ---- parent side -----------------------------------------------------------------------------


def _spawn(plan: dict, plan_path: Path, log_path: Path, timeout: float) -> str:
    """Run a child over ``plan``; returns "done" or "timeout"."""
    plan_path.write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "tools.gpu.kit", "--child", str(plan_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            proc.wait(timeout=max(timeout, 1.0))
            status = "done"
        except subprocess.TimeoutExpired:
            status = "timeout"
            kill_tree(proc)
        except BaseException:
            kill_tree(proc)
            raise
    return status


def _tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def collect(ctx: dict, log: Path, attempted: bool, limit: float | None) -> dict:
    """A step's report entry from what its child left behind."""
    work = Path(ctx["work_dir"])
    path = Path(ctx["result_path"])
    rec = {"figures": {}, "checks": [], "targets": [], "notes": [], "error": None, "seconds": 0.0}
    if path.is_file():
        rec.update(json.loads(path.read_text()))
    started = (work / "started").is_file()
    if started and not rec.get("finished"):
        rec.update(status="timeout", passed=False)
        limit_text = f"its time limit ({limit:.0f} s)" if limit else "the kit's budget"
        rec["error"] = f"killed at {limit_text}\n" + _tail(log)
    elif not started:
        rec.update(status="skipped", passed=False, error="no time left in the budget")
        if attempted:
            rec.update(status="error", error="its process did not start:\n" + _tail(log))
    elif rec.get("error"):
        rec["status"], rec["passed"] = "error", False
    else:
        rec["status"] = "pass" if rec.get("passed") else "fail"
    return rec


def plan_timeout(index: int, names: list[str], table: dict, remaining: float, dry: bool) -> float:
    """A section's limit: its nominal time, plus what earlier sections left unused, never
    eating into the nominal time of the sections after it; always within what remains."""
    nominal = [table[n].dry_s if dry else table[n].gpu_s for n in names]
    later = sum(nominal[index + 1 :])
    return max(0.0, min(remaining - 5, max(nominal[index], remaining - later)))


def run_steps(steps: list[dict], isolate: bool, deadline: float, logs: Path) -> dict[str, dict]:
    """Run helpers and sections, isolated (one child each) or all in one child."""
    table = {s.name: s for s in SECTIONS}
    names = [s["ctx"]["name"] for s in steps if s["ctx"]["name"] in table]
    records = {}
    if not isolate:
        log = logs / "shared.log"
        _spawn({"steps": steps, "deadline": deadline}, logs / "plan.json", log,
               deadline - time.time())  # fmt: skip
        for step in steps:
            records[step["ctx"]["name"]] = collect(step["ctx"], log, False, None)
        return records
    for step in steps:
        name = step["ctx"]["name"]
        remaining = deadline - time.time()
        limit = (plan_timeout(names.index(name), names, table, remaining, step["ctx"]["dry_run"])
                 if name in table else min(HELPER_S, remaining - 5))  # fmt: skip
        log = logs / f"{name}.log"
        began = time.time()
        if limit >= MIN_SECTION_S:
            print(f"[kit] {name}: running (limit {limit:.0f} s)", flush=True)
            plan = {"steps": [step], "deadline": time.time() + limit}
            _spawn(plan, logs / f"plan_{name}.json", log, limit + 10)
        records[name] = rec = collect(step["ctx"], log, limit >= MIN_SECTION_S, limit)
        if rec["status"] == "timeout":
            rec["seconds"] = round(time.time() - began, 1)
        print(f"[kit] {name}: {rec['status']} ({rec['seconds']:.0f} s)", flush=True)
        if rec["status"] not in ("pass", "skipped"):
            print(_tail(log, 25), flush=True)
    return records


def run_kit(args) -> int:
    from tools.gpu.report import REQUIRED_SECTIONS, render_markdown, write_report

    start = time.time()
    budget = args.budget_s or DEFAULT_BUDGET_S["dry" if args.dry_run else "gpu"]
    deadline = start + budget
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vcap_gpu_kit_")).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    table = {s.name: s for s in SECTIONS}
    names = [n for n in (args.sections.split(",") if args.sections else table) if n]
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; known: {list(table)}")
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.dry_run)

    def step(name: str) -> dict:
        module = table[name].module if name in table else HELPERS[name]
        ctx = {"name": name, "dry_run": args.dry_run, "kit_dir": str(Path(args.kit_dir).resolve()),
               "work_dir": str(work / name), "deadline": deadline,
               "result_path": str(work / name / "result.json")}  # fmt: skip
        return {"module": module, "ctx": ctx}

    print(f"[kit] {'dry run' if args.dry_run else 'GPU run'}: budget {budget:.0f} s, "
          f"{'one process per section' if isolate else 'one process'}, sections {names}")  # fmt: skip
    records = run_steps([step(n) for n in ("env", "fixtures", *names)], isolate, deadline, logs)
    env = records.pop("env")
    report = {"kit": "megatron_vcap GPU kit", "dry_run": args.dry_run, "budget_s": budget,
              "isolated": isolate, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "env": {**env.get("figures", {}), "status": env["status"]},
              "fixtures": records.pop("fixtures"), "sections": records}  # fmt: skip
    # A full run must hold every required section; a rerun of some (--sections) is judged on them.
    missing = [n for n in REQUIRED_SECTIONS if n not in records]
    complete = not missing or bool(args.sections)
    report["passed"] = complete and all(s["passed"] for s in records.values())
    if missing:
        report["missing_sections"] = missing
    report["wall_s"] = time.time() - start
    write_report(report, out)
    with open(out / "kit.log", "wb") as kit_log:
        for path in sorted(logs.glob("*.log")):
            kit_log.write(f"\n===== {path.name} =====\n".encode())
            kit_log.write(path.read_bytes()[-LOG_CAP_BYTES:])
    print(render_markdown(report), flush=True)
    print(f"[kit] wrote {out}/report.json, report.md, kit.log", flush=True)
    return 0 if report["passed"] else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child)
    return run_kit(args)


if __name__ == "__main__":
    sys.exit(main())
