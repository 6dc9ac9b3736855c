"""The openai judge against a real loopback HTTP server speaking the chat-completions API.

The server (``megatron_vcap.testing.fake_openai``) is scripted to answer correctly, slowly, with
HTTP errors, with malformed or contract-breaking JSON, or not at all.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from megatron_vcap.rewards.config import JudgeConfig
from megatron_vcap.rewards.judges.base import JudgeError
from megatron_vcap.rewards.judges.openai_judge import OpenAIJudge
from megatron_vcap.testing.fake_openai import FakeOpenAIServer

SECRET = "sk-test-do-not-leak-4242"
ENV = "VCAP_TEST_JUDGE_KEY"


def judge_cfg(server: FakeOpenAIServer, **kw) -> JudgeConfig:
    base = dict(
        kind="openai",
        base_url=server.base_url,
        model="judge-model",
        api_key_env=ENV,
        timeout_s=0.5,
        max_retries=3,
        backoff_s=0.01,
        max_backoff_s=0.05,
    )
    base.update(kw)
    return JudgeConfig(**base)


def run(coro_fn, cfg: JudgeConfig):
    async def main():
        judge = OpenAIJudge(cfg)
        try:
            return await coro_fn(judge), judge.stats()
        finally:
            await judge.aclose()

    return asyncio.run(main())


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(ENV, SECRET)


def test_correct_answers_structured_output_and_key_from_env(caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer() as server:
        cfg = judge_cfg(server, cache_dir=str(tmp_path / "cache"))
        verdicts, stats = run(
            lambda j: j.entail("A man walks a brown dog.", ["The man walks.", "A cat jumps."]), cfg
        )
    assert verdicts == ["entailment", "neutral"]
    assert stats["requests"] == 1 and stats.get("retries", 0) == 0
    body = server.bodies[0]
    assert body["model"] == "judge-model"
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["name"] == "event_entailment"
    assert server.auth_headers == {f"Bearer {SECRET}"}
    # The key is never logged nor written next to the cached answers.
    assert SECRET not in caplog.text
    for path in Path(tmp_path).rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text()


def test_retries_through_every_kind_of_fault():
    script = ["http_500", "malformed", "http_429", "hang", "disconnect", "invalid", "html"]
    with FakeOpenAIServer(script=script) as server:
        events, stats = run(
            lambda j: j.extract_events("A man walks. A dog barks."),
            judge_cfg(server, max_retries=7),
        )
    assert events == ["A man walks.", "A dog barks."]
    # One request, seven retries: counted apart (issue 14, item 7), sent eight times in all.
    assert stats["requests"] == 1 and stats["retries"] == 7 and stats["attempts"] == 8
    for code in (
        "http_500",
        "malformed_json",
        "rate_limited",
        "timeout",
        "connection_error",
        "invalid_answer",
    ):
        assert stats[f"errors/{code}"] == (2 if code == "invalid_answer" else 1), code


@pytest.mark.parametrize(
    "behaviour, code",
    [
        ("http_500", "http_500"),
        ("malformed", "malformed_json"),
        ("invalid", "invalid_answer"),
        ("hang", "timeout"),
    ],
)
def test_gives_up_after_max_retries_with_the_reason(behaviour, code):
    with FakeOpenAIServer(script=[behaviour] * 3) as server:
        cfg = judge_cfg(server, max_retries=2, timeout_s=0.3)
        with pytest.raises(JudgeError) as exc:
            run(lambda j: j.rate("A man walks.", "A man walks."), cfg)
        assert server.stats["requests"] == 3
    assert exc.value.code == code
    assert "after 3 attempt(s)" in str(exc.value)


@pytest.mark.parametrize("behaviour", ["http_400", "http_401"])
def test_client_errors_are_not_retried(behaviour):
    with FakeOpenAIServer(script=[behaviour]) as server:
        with pytest.raises(JudgeError) as exc:
            run(lambda j: j.rate("A man walks.", "A man walks."), judge_cfg(server))
        assert server.stats["requests"] == 1
    assert exc.value.code == behaviour


def test_cache_makes_reruns_free_and_is_keyed_by_model(tmp_path):
    cache = str(tmp_path / "cache")
    work = lambda j: j.entail("A man walks.", ["The man walks.", "A dog runs."])  # noqa: E731
    with FakeOpenAIServer() as server:
        first, _ = run(work, judge_cfg(server, cache_dir=cache))
        second, stats = run(work, judge_cfg(server, cache_dir=cache))
        assert server.stats["requests"] == 1
        assert second == first and stats["cache_hits"] == 1 and stats.get("requests", 0) == 0
        run(work, judge_cfg(server, cache_dir=cache, model="another-model"))
        assert server.stats["requests"] == 2
    # Malformed answers are never cached: a fresh directory, a malformed then a good answer.
    with FakeOpenAIServer(script=["malformed"]) as server:
        run(work, judge_cfg(server, cache_dir=str(tmp_path / "c2")))
    assert len(list((tmp_path / "c2").rglob("*.json"))) == 1


def test_corrupt_cache_entry_is_a_miss(tmp_path):
    cache = tmp_path / "cache"
    work = lambda j: j.rate("A man walks.", "A man walks.")  # noqa: E731
    with FakeOpenAIServer() as server:
        run(work, judge_cfg(server, cache_dir=str(cache)))
        (entry,) = cache.rglob("*.json")
        entry.write_text("{not json")
        rating, stats = run(work, judge_cfg(server, cache_dir=str(cache)))
        assert rating == (10, 7) and server.stats["requests"] == 2


def test_concurrency_is_bounded():
    async def many(j):
        return await asyncio.gather(
            *(j.rate("A man walks.", f"A man walks {i}.") for i in range(12))
        )

    with FakeOpenAIServer(latency_s=0.3) as server:
        ratings, _ = run(many, judge_cfg(server, concurrency=4, timeout_s=5.0))
    assert len(ratings) == 12
    # Never more than 4 in flight, and requests did overlap.
    assert 1 < server.max_in_flight <= 4


# ---------------------------------------------------------------- issue 14, items 5-7
@pytest.mark.parametrize(
    "wrap",
    [
        lambda a: f"```json\n{a}\n```",
        lambda a: f"```\n{a}\n```\nThe first event is entailed because the man walks.",
        lambda a: f"Here is my judgement: {a}\nLet me know if you need more.",
        lambda a: f"{a}\n\nNote: {{'verdicts'}} follow the order given.",
    ],
)
def test_fenced_or_chatty_answers_are_accepted(wrap):
    """A server that ignores response_format answers like a chat model (item 6)."""
    import json

    from megatron_vcap.testing.fake_openai import oracle_answer

    def answer(body):
        return wrap(json.dumps(oracle_answer(body)))

    with FakeOpenAIServer(answer=answer) as server:
        verdicts, stats = run(
            lambda j: j.entail("A man walks a dog.", ["The man walks.", "A cat jumps."]),
            judge_cfg(server, timeout_s=10.0),
        )
    assert verdicts == ["entailment", "neutral"]
    assert stats["requests"] == 1 and stats.get("retries", 0) == 0


def test_answer_without_a_json_object_is_still_malformed():
    with (
        FakeOpenAIServer(answer=lambda body: "I think { the man walks") as server,
        pytest.raises(JudgeError) as exc,
    ):
        run(lambda j: j.rate("A man walks.", "A man walks."), judge_cfg(server, max_retries=1))
    assert exc.value.code == "malformed_json"


@pytest.mark.parametrize(
    "value",
    [
        "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z",
        "sk-test-do-not-leak-4242",
        "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345",
        "3f9a0c2b7d4e4f1a8b6c5d2e1f0a9b8c",
        "a3f9a0c2b7d4e4f1a8b6c5d2e1f0a9b8",
    ],
)
def test_key_looking_values_are_refused_without_being_echoed(value, caplog):
    from megatron_vcap.config.loader import ConfigError
    from megatron_vcap.rewards.config import looks_like_api_key

    assert looks_like_api_key(value)
    with pytest.raises(ConfigError) as exc:
        JudgeConfig(kind="openai", api_key_env=value).validate()
    assert value not in str(exc.value) and "name of an environment variable" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        OpenAIJudge(JudgeConfig(kind="openai", api_key_env=value))
    assert value not in str(exc.value) and value not in caplog.text


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "HF_TOKEN", "my_judge_key2", "VCAP_KEY_2026"])
def test_variable_names_are_names(name):
    from megatron_vcap.rewards.config import looks_like_api_key

    assert not looks_like_api_key(name)
    JudgeConfig(kind="openai", api_key_env=name).validate()


def test_identical_prompts_in_flight_are_sent_once():
    async def many(j):
        same = [j.rate("A man walks.", "A man walks.") for _ in range(8)]
        other = [j.rate("A man walks.", "A man runs.")]
        return await asyncio.gather(*same, *other)

    with FakeOpenAIServer(latency_s=0.2) as server:
        ratings, stats = run(many, judge_cfg(server, timeout_s=5.0))
    assert ratings[:8] == [ratings[0]] * 8 and len(ratings) == 9
    assert server.stats["requests"] == 2
    assert stats["requests"] == 2 and stats["deduplicated"] == 7


def test_identical_prompts_in_flight_share_a_failure():
    async def many(j):
        return await asyncio.gather(
            *(j.rate("A man walks.", "A man walks.") for _ in range(4)), return_exceptions=True
        )

    with FakeOpenAIServer(script=["http_400"], latency_s=0.1) as server:
        outcomes, stats = run(many, judge_cfg(server, timeout_s=5.0))
    assert all(isinstance(o, JudgeError) and o.code == "http_400" for o in outcomes)
    assert server.stats["requests"] == 1 and stats["deduplicated"] == 3
