"""``reward.custom_fn``: a user rule reward added to the total with its weight."""

import pytest

from megatron_vcap.config.loader import ConfigError
from megatron_vcap.rewards.config import JudgeConfig, RewardConfig
from megatron_vcap.rewards.service import RewardRequest, RewardService


def count_x(response: str, request) -> float:
    return float(response.count("x"))


def test_custom_reward_adds_to_total():
    cfg = RewardConfig(custom_fn=f"{__name__}:count_x", w_custom=0.5)
    with RewardService(cfg, JudgeConfig()) as service:
        reqs = [
            RewardRequest("a", "no tags here, xx", "cap", [], []),
            RewardRequest("b", "x", "cap", [], []),
        ]
        results = service.score(reqs)
    # Unparseable responses: format, think and caption are 0, so total = 0.5 * count("x").
    assert [r.total for r in results] == [1.0, 0.5]
    assert [r.details["custom"] for r in results] == [2.0, 1.0]


def test_bad_custom_reward_spec_names_the_key():
    with pytest.raises(ConfigError, match="custom_fn"):
        RewardConfig(custom_fn="no_colon").validate()
    with pytest.raises(ConfigError, match="reward.custom_fn: cannot load"):
        RewardService(RewardConfig(custom_fn="megatron_vcap.nope:fn"), JudgeConfig())
