"""Step logging: console line with the time breakdown, metrics.jsonl, wandb offline without a key."""

import json

from megatron_vcap.config.job import LoggingConfig
from megatron_vcap.trainer.metrics_log import MetricsLogger, PhaseTimer, format_console_line


def test_console_line_and_jsonl(tmp_path, capsys):
    timer = PhaseTimer()
    with timer.phase("rollout"):
        pass
    with timer.phase("update"):
        pass
    metrics = {"reward/total_mean": 1.25, "loss": 0.5, "kl": 0.01, **timer.as_metrics()}
    logger = MetricsLogger(tmp_path, LoggingConfig(log_interval=2), enabled=True, config_dict={})
    logger.log(1, metrics)
    logger.log(2, metrics)
    logger.close()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[train] step 2")  # every log_interval steps
    assert "reward 1.250" in out[0] and "rollout" in out[0] and "update" in out[0]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == 0.5


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "x", LoggingConfig(), enabled=False, config_dict={})
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "x").exists()


def test_wandb_offline_without_key_and_key_never_written(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("JUDGE_API_KEY", "sk-secret-value-123")
    cfg = LoggingConfig(wandb=True, wandb_project="unit")
    logger = MetricsLogger(
        tmp_path / "run", cfg, enabled=True, config_dict={"judge": {"api_key_env": "JUDGE_API_KEY"}}
    )
    assert logger._wandb is not None and logger._wandb.settings.mode == "offline"
    logger.log(1, {"loss": 0.25})
    logger.close()
    assert any((tmp_path / "run" / "wandb").glob("offline-run-*"))
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert b"sk-secret-value-123" not in path.read_bytes(), path


def test_console_line_prefix_and_format():
    line = format_console_line(3, "grpo", {"loss": 0.1})
    assert line.startswith("[grpo] step 3") and "loss 0.1000" in line
