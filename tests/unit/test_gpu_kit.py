"""The GPU kit's pure parts: FLOP / byte formulas against sums written out here, the wheel
list, the size accounting of what a device call carries, the time planning, the report."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tools.gpu import flops, kit, prepare, report


def test_lm_train_flops_matches_megatrons_formula_written_out():
    # One sequence, s=8, L=2, h=4, n=2 heads of d=2 (q proj 4 = h), g=1 KV head, f=6, V=10:
    # 12 s L h^2 [(1 + 1/2 + 8/4) * 1 + (6/4) * 1.5 + 10 / (2*2*4)] = 12*8*2*16 * 6.375.
    got = flops.lm_train_flops([8], num_layers=2, hidden=4, num_heads=2, num_kv_heads=1,
                               head_dim=2, ffn_hidden=6, vocab=10)  # fmt: skip
    assert got == pytest.approx(12 * 8 * 2 * 16 * (3.5 + 2.25 + 0.625))
    two = flops.lm_train_flops([8, 8], num_layers=2, hidden=4, num_heads=2, num_kv_heads=1,
                               head_dim=2, ffn_hidden=6, vocab=10)  # fmt: skip
    assert two == pytest.approx(2 * got)


def test_vision_segments_tile_frames_into_windows():
    # A frame of 6 x 10 patches, merge 2 -> 3 x 5 units; windows of 2 x 2 units: rows [2, 1],
    # cols [2, 2, 1] -> unit counts 4 4 2 / 2 2 1, times 4 patches each; 2 frames.
    frames, windows = flops.vision_segments([[2, 6, 10]], merge=2, window_units=2)
    assert frames == [60, 60]
    assert windows == [16, 16, 8, 8, 8, 4] * 2
    assert sum(windows) == sum(frames)


def test_vision_train_flops_written_out():
    # One frame of 2 x 2 patches (merge 2: one unit), d=4, f=6 gated, patch_dim 3, out 5,
    # depth 2, block 1 full, block 0 windowed with 1-unit windows (= the frame here).
    n, d, f = 4, 4, 6
    per_block = 2 * n * (4 * d * d + 3 * d * f) + 4 * n * n * d
    embed = 2 * n * 3 * d
    merger = 2 * 1 * (16 * 16 + 16 * 5)
    got = flops.vision_train_flops([[1, 2, 2]], depth=2, hidden=d, ffn_hidden=f, gated=True,
                                   patch_dim=3, merge=2, out_hidden=5, window_units=1,
                                   full_blocks=(1,))  # fmt: skip
    assert got == 3 * (embed + 2 * per_block + merger)


def test_decode_bytes_written_out():
    # L=1, h=4, n=2, g=1, d=2, f=3, V=5, 2-byte weights; contexts 10 and 6.
    qkv = 4 * 4 * 2 + 4 * 2  # [h, (n + 2g) d] weight + bias
    layer = qkv + 4 * 4 + 3 * 4 * 3 + 2 * 4
    weights = 2 * (layer + 4 + 5 * 4)
    kv = 2 * 1 * 1 * 2 * 2 * (10 + 6)
    got = flops.decode_bytes_per_step([10, 6], num_layers=1, hidden=4, num_heads=2,
                                      num_kv_heads=1, head_dim=2, ffn_hidden=3, vocab=5)  # fmt: skip
    assert got == weights + kv


def test_datasheet_ceilings_match_device_names():
    assert flops.datasheet_ceiling("NVIDIA H200").hbm_bytes_per_s == 4.8e12
    assert flops.datasheet_ceiling("NVIDIA H100 80GB HBM3").hbm_bytes_per_s == 3.35e12
    assert flops.datasheet_ceiling("NVIDIA H100 PCIe").hbm_bytes_per_s == 2.0e12
    assert flops.datasheet_ceiling("cpu").bf16_flops is None


def test_wheel_list_pins_one_version_each_and_rejects_bad_lines(tmp_path):
    wheels = prepare.read_wheel_list()
    names = [n.lower() for n, _, _ in wheels]
    assert len(names) == len(set(names))
    assert {"megatron-core", "psutil", "av", "openai"} <= set(names)
    assert "wandb" not in names and not any(n.startswith("transformer") for n in names)
    bad = tmp_path / "wheels.txt"
    bad.write_text("# fine\nmegatron-core==0.16.1 core\nopenai>=1 judge\n")
    with pytest.raises(ValueError, match="wheels.txt:3"):
        prepare.read_wheel_list(bad)
    assert prepare.wheel_project("pydantic_core-2.50.5-cp312-cp312-x.whl") == "pydantic-core"


def test_size_accounting_counts_tracked_and_untracked_not_ignored(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("/.gpu_kit/\nbig.bin\n")
    (tmp_path / "tracked.py").write_bytes(b"x" * 1000)
    (tmp_path / "new.txt").write_bytes(b"y" * 500)  # untracked, not ignored: travels
    (tmp_path / "big.bin").write_bytes(b"z" * 10_000)  # ignored: stays
    git("add", "tracked.py", ".gitignore")
    kit_dir = tmp_path / ".gpu_kit"
    (kit_dir / "wheels").mkdir(parents=True)
    (kit_dir / "wheels" / "a.whl").write_bytes(b"w" * 3 * prepare.MIB)
    assert prepare.is_ignored(kit_dir, tmp_path)
    tree = 1000 + 500 + len("/.gpu_kit/\nbig.bin\n")
    assert prepare.travelling_tree_bytes(tmp_path) == tree
    sizes = prepare.size_report(kit_dir, max_carry_mib=2, repo=tmp_path)
    assert sizes["carry_mib"] == pytest.approx(3.0)
    assert sizes["total_mib"] == pytest.approx(3.0 + tree / prepare.MIB)
    assert sizes["problems"] and "> 2" in sizes["problems"][0]
    call = prepare.device_call(kit_dir, tmp_path)
    assert call["carry"] == [".gpu_kit"] and call["command"] == "bash tools/gpu/run.sh"


def test_plan_timeout_gives_slack_forward_but_keeps_later_nominal_time():
    table = {s.name: s for s in kit.SECTIONS}
    names = [s.name for s in kit.SECTIONS]
    nominal = [table[n].gpu_s for n in names]
    # On schedule: each section gets exactly its nominal time.
    assert kit.plan_timeout(0, names, table, sum(nominal), dry=False) == nominal[0]
    # 60 s ahead of schedule: the slack goes to the next section.
    assert kit.plan_timeout(1, names, table, sum(nominal[1:]) + 60, dry=False) == nominal[1] + 60
    # Behind schedule: never more than what remains.
    assert kit.plan_timeout(5, names, table, 20, dry=False) == 15


def test_markdown_report_lists_every_section_and_failed_check():
    rep = {"dry_run": True, "passed": False, "wall_s": 3.0, "env": {"device": "cpu"},
           "sections": {"decode": {"status": "fail", "seconds": 1.0, "figures": {"x": 1.5},
                                   "checks": [{"name": "c", "passed": False, "value": 2}],
                                   "targets": [], "notes": []}}}  # fmt: skip
    md = report.render_markdown(rep)
    assert "| decode | fail | 1 |  | 0/1 |" in md and "FAIL c = 2" in md and "x: 1.5" in md


def test_gpu_shapes_are_qwen25_vl_7b_and_fit_the_gpus():
    from megatron_vcap.models.hf_config import describe_hf_config
    from tools.gpu import shapes

    spec = describe_hf_config(shapes.qwen_vl_config(False, layers=28, vision_depth=32))
    assert (spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (
        3584,
        28,
        4,
        128,
    )
    assert (spec.ffn_hidden_size, spec.vocab_size) == (18944, 152064)
    assert spec.fullatt_block_indexes == (7, 15, 23, 31) and spec.window_size == 112
    # 28 layers of ~233M parameters plus the 545M output layer, in bf16: ~14.1 GB per step.
    weights = flops.lm_weight_bytes(**flops.lm_shape(spec))
    assert 13.9e9 < weights < 14.3e9
    per_layer = shapes.lm_layer_params(3584, 28, 4, 128, 18944)
    assert 2.3e8 < per_layer < 2.4e8
    fixed = 2 * 152064 * 3584 + 0.68e9  # embedding + output layer + vision tower
    # nvidia-smi's H200 (143771 MiB, KINDS.md) and H100 80GB (81559 MiB) memory:
    assert (
        shapes.layers_that_fit(143771 * 2**20, fixed_params=fixed, per_layer_params=per_layer) == 12
    )
    assert (
        shapes.layers_that_fit(81559 * 2**20, fixed_params=fixed, per_layer_params=per_layer) == 3
    )


def test_rollout_gpu_arguments_parse():
    from tools import bench_generate
    from tools.gpu import rollout

    args = bench_generate.parse_args(rollout.GPU + ["--core-attention", "sdpa"])
    assert args.dtype == "bf16" and args.group_size == 8 and args.hidden // args.heads == 128


def test_kill_tree_ends_descendants_in_sessions_of_their_own(tmp_path):
    """What torchrun does: its workers run in new sessions, beyond the child's process group."""
    import os
    import sys
    import time

    from tools.gpu.common import kill_tree

    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, time; p = subprocess.Popen(['sleep', '120'], "
            f"start_new_session=True); open({str(pid_file)!r}, 'w').write(str(p.pid)); "
            "time.sleep(120)")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    for _ in range(200):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    kill_tree(proc)
    assert proc.returncode is not None
    for _ in range(100):  # the grandchild is re-parented once killed; wait until it is reaped
        try:
            os.kill(grandchild, 0)
            stat = Path(f"/proc/{grandchild}/stat").read_text()
        except (ProcessLookupError, FileNotFoundError):
            break
        if stat.rsplit(")", 1)[1].split()[0] == "Z":  # killed, not yet reaped by init
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"grandchild {grandchild} still runs")
