"""The judge client's free-form tasks (no JSON schema, a task-specific decoder), which the
benchmark protocols need: their judges (GPT-3.5, Llama-3.1-8B) answer in their own formats."""

from __future__ import annotations

import asyncio

from megatron_vcap.rewards.config import JudgeConfig
from megatron_vcap.rewards.judges.openai_judge import OpenAIJudge
from megatron_vcap.rewards.prompts import InvalidAnswer, JudgeTask
from megatron_vcap.testing.fake_openai import FakeOpenAIServer


def _decode(text: str) -> str:
    text = text.strip()
    if not text:
        raise InvalidAnswer("empty answer")
    return text.upper()


def _task() -> JudgeTask:
    msgs = ({"role": "user", "content": "What colour is the car?"},)
    return JudgeTask("short_answer", msgs, None, lambda v: v, decode=_decode)


def _ask(cfg: JudgeConfig) -> tuple[str, dict]:
    async def main():
        judge = OpenAIJudge(cfg)
        try:
            return await judge.run(_task()), judge.stats()
        finally:
            await judge.aclose()

    return asyncio.run(main())


def test_free_form_task_sends_no_schema_decodes_retries_and_caches(tmp_path):
    answers = iter(["   ", "  red car \n", "never asked"])
    with FakeOpenAIServer(require_schema=False, answer=lambda body: next(answers)) as server:
        cfg = JudgeConfig(
            kind="openai",
            base_url=server.base_url,
            model="m",
            cache_dir=str(tmp_path),
            backoff_s=0.0,
            max_backoff_s=0.0,
        )
        value, stats = _ask(cfg)
        assert value == "RED CAR"
        assert stats["requests"] == 1 and stats["retries"] == 1 and stats["attempts"] == 2
        assert stats["errors/invalid_answer"] == 1
        assert all("response_format" not in b for b in server.bodies)
        # The cached raw text goes through the same decoder; no new request.
        value, stats = _ask(cfg)
        assert value == "RED CAR" and stats.get("requests", 0) == 0 and stats["cache_hits"] == 1
        assert server.stats["requests"] == 2


def test_schema_still_required_by_default():
    with FakeOpenAIServer(answer=lambda body: "x") as server:
        cfg = JudgeConfig(kind="openai", base_url=server.base_url, model="m", max_retries=0)
        try:
            _ask(cfg)
        except Exception as exc:  # the fake server answers 400 without a schema
            assert "http_400" in str(exc)
        else:
            raise AssertionError("a schema-less request was accepted")


def test_temperature_none_sends_none_and_the_yaml_accepts_null(tmp_path):
    from megatron_vcap.config.job import load_job_config

    with FakeOpenAIServer(require_schema=False, answer=lambda body: "ok") as server:
        for temperature in (None, 0.0):
            cfg = JudgeConfig(kind="openai", base_url=server.base_url, model="m",
                              temperature=temperature)  # fmt: skip
            assert _ask(cfg)[0] == "OK"
    assert "temperature" not in server.bodies[0] and server.bodies[1]["temperature"] == 0.0
    job = tmp_path / "job.yaml"
    job.write_text("judge:\n  temperature: null\n")
    assert load_job_config(job).judge.temperature is None
