"""``tools/gpu/prepare.sh``: fill ``.gpu_kit/`` here, with no GPU, for one device call there.

    bash tools/gpu/prepare.sh [--with-decord] [--no-download] [--refresh-fixtures]

1. downloads the Python 3.12 x86-64 wheels of ``tools/gpu/wheels.txt`` into ``.gpu_kit/wheels``
   (``pip download --no-deps --only-binary=:all: --python-version 3.12 ...``; stale wheels are
   removed, so exactly one version of each is carried);
2. writes the fixtures (:mod:`tools.gpu.fixtures`) into ``.gpu_kit/fixtures``;
3. checks the sizes: the carried folder at most ``--max-carry-mib`` (60), and it plus the working
   tree that travels (tracked and untracked-not-ignored files, ``git ls-files``) under the
   device's 64 MiB;
4. prints the device call: the command, the paths to carry and the timeout.

``.gpu_kit/`` is git-ignored (``.gitignore``): it travels only because the call names it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from tools.gpu.fixtures import ensure_fixtures, folder_bytes

REPO = Path(__file__).resolve().parents[2]
WHEELS_TXT = Path(__file__).with_name("wheels.txt")
MIB = 2**20
DEVICE_LIMIT_MIB = 64
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64",
             "manylinux_2_12_x86_64", "manylinux1_x86_64")  # fmt: skip
CALL_TIMEOUT_S = 540


def read_wheel_list(path: Path = WHEELS_TXT) -> list[tuple[str, str, str]]:
    """(name, version, group) per line of ``wheels.txt``; errors name the line."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0].count("==") != 1:
            raise ValueError(f"{path}:{number}: expected 'name==version group', got {line!r}")
        name, version = parts[0].split("==")
        out.append((name, version, parts[1]))
    return out


def wheel_project(filename: str) -> str:
    """Normalised project name of a wheel file (``pydantic_core-2.5-...whl`` -> pydantic-core)."""
    return filename.split("-", 1)[0].lower().replace("_", "-")


def download_wheels(dest: Path, wanted: list[tuple[str, str, str]], python_version: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    names = {name.lower() for name, _, _ in wanted}
    pins = {f"{n.lower()}-{v}" for n, v, _ in wanted}
    for old in dest.glob("*.whl"):  # one version of each: two would stop the install there
        project, version = wheel_project(old.name), old.name.split("-")[1]
        if project not in names or f"{project}-{version}" not in pins:
            old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(dest)]  # fmt: skip
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += [f"{n}=={v}" for n, v, _ in wanted]
    subprocess.run(cmd, check=True)
    have = {wheel_project(w.name) for w in dest.glob("*.whl")}
    lacking = sorted(names - have)
    if lacking:
        raise SystemExit(f"prepare: pip downloaded no wheel for {lacking}")


def travelling_tree_bytes(repo: Path = REPO) -> int:
    """Bytes of what a device call sends besides ``carry``: tracked plus untracked files that
    git does not ignore (``shared/`` inside the checkout is among them when present)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=repo, capture_output=True, check=True).stdout  # fmt: skip
    total = 0
    for name in out.decode().split("\0"):
        path = repo / name
        if name and path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def is_ignored(path: Path, repo: Path = REPO) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=repo).returncode == 0


def device_call(kit_dir: Path, repo: Path = REPO) -> dict:
    """The arguments of the device tool's ``run``: one call runs every section."""
    return {
        "command": "bash tools/gpu/run.sh",
        "carry": [str(kit_dir.resolve().relative_to(repo.resolve()))],
        "timeout_s": CALL_TIMEOUT_S,
    }


def size_report(kit_dir: Path, max_carry_mib: float, repo: Path = REPO) -> dict:
    carry = folder_bytes(kit_dir)
    tree = travelling_tree_bytes(repo)
    report = {
        "wheels_mib": folder_bytes(kit_dir / "wheels") / MIB,
        "fixtures_mib": folder_bytes(kit_dir / "fixtures") / MIB,
        "carry_mib": carry / MIB,
        "tree_mib": tree / MIB,
        "total_mib": (carry + tree) / MIB,
    }
    problems = []
    if report["carry_mib"] > max_carry_mib:
        problems.append(f"{kit_dir} is {report['carry_mib']:.1f} MiB > {max_carry_mib} MiB")
    if report["total_mib"] > DEVICE_LIMIT_MIB:
        problems.append(f"carry + tree {report['total_mib']:.1f} MiB > {DEVICE_LIMIT_MIB} MiB")
    report["problems"] = problems
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kit-dir", default=str(REPO / ".gpu_kit"))
    p.add_argument("--with-decord", action="store_true", help="also carry decord (13.6 MB)")
    p.add_argument("--no-download", action="store_true", help="fixtures and sizes only")
    p.add_argument("--refresh-fixtures", action="store_true")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    p.add_argument("--max-carry-mib", type=float, default=60)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    kit = Path(args.kit_dir).resolve()
    inside = kit.is_relative_to(REPO.resolve())
    kit.mkdir(parents=True, exist_ok=True)  # git matches the ignore rule "/.gpu_kit/" to a folder
    if inside and not is_ignored(kit):
        raise SystemExit(f"prepare: {kit} is not git-ignored; it would travel twice")
    wanted = [w for w in read_wheel_list() if w[2] != "decord" or args.with_decord]
    if not args.no_download:
        download_wheels(kit / "wheels", wanted, args.python_version)
    ensure_fixtures(kit / "fixtures", force=args.refresh_fixtures)
    sizes = size_report(kit, args.max_carry_mib)
    wheels = sorted(w.name for w in (kit / "wheels").glob("*.whl"))
    (kit / "kit.json").write_text(json.dumps({"wheels": wheels, "sizes": sizes}, indent=1))
    print(f"wheels   {sizes['wheels_mib']:6.1f} MiB  ({len(wheels)} files in {kit / 'wheels'})")
    print(f"fixtures {sizes['fixtures_mib']:6.1f} MiB")
    print(f"carry    {sizes['carry_mib']:6.1f} MiB  (limit {args.max_carry_mib:g})")
    print(f"tree     {sizes['tree_mib']:6.1f} MiB  (tracked + untracked-not-ignored files)")
    print(f"total    {sizes['total_mib']:6.1f} MiB  (device limit {DEVICE_LIMIT_MIB} per call)")
    if sizes["problems"]:
        print("prepare: TOO LARGE: " + "; ".join(sizes["problems"]), file=sys.stderr)
        return 1
    if not inside:
        print(f"note: {kit} lies outside the repo; copy it into the repo to carry it")
    call = device_call(kit) if inside else {"command": "bash tools/gpu/run.sh"}
    print("\nThe device call (one call runs every section; about 8 minutes):")
    print(json.dumps(call, indent=1))
    print(
        'A rerun of some sections with less time, e.g.: {"command": "bash tools/gpu/run.sh '
        '--sections decode,rollout --budget-s 150", "carry": [".gpu_kit"], "timeout_s": 240}'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
