"""Config system: typed loading, overrides, validation errors naming the key, CLI behaviour."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_vcap.config.job import JobConfig, load_job_config, save_resolved_config
from megatron_vcap.config.loader import ConfigError, parse_override, to_dict
from megatron_vcap.data.config import DataConfig


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_overrides_fill_typed_sections(tmp_path):
    path = write(tmp_path, "grpo:\n  group_size: 4\ntrain:\n  lr: 1.0e-5\n")
    cfg = load_job_config(path, ["grpo.kl_beta=0.1", "rollout.stop_strings=['</answer>', 'x']"])
    assert cfg.grpo.group_size == 4
    assert cfg.grpo.kl_beta == pytest.approx(0.1)
    assert cfg.train.lr == pytest.approx(1e-5)
    assert cfg.rollout.stop_strings == ["</answer>", "x"]
    # An int given for a float field is accepted and converted.
    assert isinstance(load_job_config(None, ["train.lr=1"]).train.lr, float)
    # YAML 1.1 reads 2e-3 as a string; float fields accept numeric text.
    assert load_job_config(None, ["train.lr=2e-3"]).train.lr == pytest.approx(2e-3)


def test_unknown_key_names_key_and_closest(tmp_path):
    path = write(tmp_path, "grpo:\n  group_sise: 4\n")
    with pytest.raises(ConfigError) as exc:
        load_job_config(path)
    msg = str(exc.value)
    assert "grpo.group_sise" in msg and "group_size" in msg and str(path) in msg


def test_unknown_section_and_wrong_types():
    with pytest.raises(ConfigError, match="unknown config key 'rewrd'.*'reward'"):
        load_job_config(None, ["rewrd.w_format=1"])
    with pytest.raises(ConfigError, match="grpo.group_size: expected an integer"):
        load_job_config(None, ["grpo.group_size=eight"])
    with pytest.raises(ConfigError, match="train.mode: expected one of"):
        load_job_config(None, ["train.mode=ppo"])
    with pytest.raises(ConfigError, match="data.on_error"):
        load_job_config(None, ["data.on_error=ignore"])
    with pytest.raises(ConfigError, match="top_p"):
        load_job_config(None, ["rollout.top_p=1.5"])
    with pytest.raises(ConfigError, match="rollout.prompts_per_batch: must be >= 1"):
        load_job_config(None, ["rollout.prompts_per_batch=0"])
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        load_job_config(None, ["train.lr.x=1"])


def test_parallel_layout_checked_against_world_size():
    cfg = load_job_config(None, ["parallel.tensor_model_parallel_size=2"], world_size=4)
    assert cfg.parallel.validate_world_size(4) == 2
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        load_job_config(
            None,
            ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"],
            world_size=6,
        )


def test_override_parsing():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=hello world") == (["a"], "hello world")
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_tool_sections_share_the_train_syntax(tmp_path):
    """vcap data / reward tools load sections one way: YAML, then flags, then overrides."""
    from megatron_vcap.config.job import load_job_sections

    path = write(tmp_path, "data:\n  max_frames: 8\n  fps: 1.0\njudge:\n  model: m\n")
    cfg = load_job_sections(
        path,
        ["data.fps=4"],
        sections=("data",),
        command="vcap data validate",
        flags={"data.max_frames": 12, "data.video_backend": None},
    )
    assert (cfg.data.max_frames, cfg.data.fps) == (12, 4.0)  # flag over YAML, override last
    assert cfg.data.video_backend == DataConfig().video_backend  # a flag not given: untouched
    assert cfg.judge.model == "m"  # the whole file is read (and validated) as a job config
    with pytest.raises(ConfigError, match="only data.\\* keys apply to vcap data validate"):
        load_job_sections(
            None, ["grpo.group_size=2"], sections=("data",), command="vcap data validate"
        )
    with pytest.raises(ConfigError, match="e.g. 'judge.max_events=...'"):
        load_job_sections(None, ["max_events=3"], sections=("reward", "judge"), command="x")
    # A flag's bad value names its key, like an override's.
    with pytest.raises(ConfigError, match="judge.concurrency: must be >= 1"):
        load_job_sections(
            None, [], sections=("judge",), command="x", flags={"judge.concurrency": 0}
        )


def test_resolved_config_round_trips(tmp_path):
    cfg = load_job_config(None, ["grpo.group_size=3", "judge.kind=openai"])
    out = save_resolved_config(cfg, tmp_path / "run")
    again = load_job_config(out)
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(JobConfig()) != to_dict(cfg)


def _vcap(*args, env=None):
    full_env = {**os.environ, **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        full_env.pop(key, None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "megatron_vcap", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


@pytest.mark.parametrize(
    "yaml_text,overrides,env,needle",
    [
        ("grpo:\n  group_sise: 4\n", [], None, "group_sise"),
        ("train:\n  steps: many\n", [], None, "train.steps: expected an integer"),
        (
            "parallel:\n  tensor_model_parallel_size: 2\n",
            [],
            {"WORLD_SIZE": "3", "RANK": "0"},
            "world size 3 is not divisible",
        ),
        ("", ["grpo.kl_beta=-1"], None, "kl_beta"),
    ],
)
def test_cli_bad_config_is_one_line_no_traceback(tmp_path, yaml_text, overrides, env, needle):
    path = write(tmp_path, yaml_text)
    proc = _vcap("train", "--config", str(path), "--check", *overrides, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_cli_help_and_missing_config(tmp_path):
    # A good job's --check (and its judge probe) is tested in test_validate_job.py.
    help_text = _vcap("--help").stdout
    for cmd in ("env", "train", "demo", "convert", "data", "eval"):
        assert cmd in help_text
    missing = _vcap("train", "--config", str(tmp_path / "nope.yaml"), "--check")
    assert missing.returncode == 2 and "config file not found" in missing.stderr


def test_vcap_env_reports_stack():
    proc = _vcap("env")
    assert proc.returncode == 0, proc.stderr
    for key in (
        "torch",
        "megatron-core",
        "transformers",
        "transformer-engine",
        "cuda available",
        "layer spec",
    ):
        assert key in proc.stdout
