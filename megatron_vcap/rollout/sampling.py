"""Next-token selection: temperature, top-k, top-p (nucleus) and greedy, as pure functions.

Shape legend: B = rows being decoded, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_vcap.config.loader import ConfigError
from megatron_vcap.rollout.config import check_sampling


@dataclass
class SamplingParams:
    """What one ``generate`` call samples with. ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 1024
    eos_token_ids: list[int] = field(default_factory=list)
    # Generation of a sample stops once its decoded text contains one of these (needs decode_fn).
    stop_strings: list[str] = field(default_factory=list)
    # ... or once its tokens end with one of these id sequences.
    stop_token_ids: list[list[int]] = field(default_factory=list)
    # Never sampled (e.g. vision placeholders, which only the prompt may contain). The trainer's
    # log-probs are over the full vocabulary; these tokens' probability is negligible once the
    # policy has learnt the chat format.
    suppress_token_ids: list[int] = field(default_factory=list)
    # GRPO's greedy anchor (``grpo.greedy_anchor``): the first sample of each group is the
    # argmax decode, the others are drawn as above. Its log-probs are still reported at
    # ``temperature``, the trainer's scale.
    greedy_anchor: bool = False

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, self.top_k, self.max_new_tokens)
        if any(not s for s in self.stop_strings):
            raise ConfigError("stop_strings: empty strings are not allowed")
        if any(len(seq) == 0 for seq in self.stop_token_ids):
            raise ConfigError("stop_token_ids: empty sequences are not allowed")

    @classmethod
    def from_config(cls, cfg, eos_token_ids: list[int], **overrides) -> SamplingParams:
        """From a :class:`~megatron_vcap.rollout.config.RolloutConfig`, plus the tokenizer's EOS."""
        values = dict(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_ids=list(eos_token_ids),
            stop_strings=list(cfg.stop_strings),
        )
        values.update(overrides)
        return cls(**values)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits_BV: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (keeps >= 1 token).

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``.
    """
    if top_k > 0 and top_k < logits_BV.size(-1):
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top one stays.
        drop_sorted_BV = (probs_BV.cumsum(-1) - probs_BV) >= top_p
        drop_sorted_BV[..., 0] = False
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def sample_tokens(
    logits_BV: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    greedy_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next tokens_B: argmax when greedy, else a draw from the filtered, tempered softmax.

    ``greedy_B`` (bool) marks rows that take the argmax whatever the temperature; every row
    still draws, so the generator's stream does not depend on which rows are greedy."""
    if params.suppress_token_ids:
        logits_BV = logits_BV.clone()
        logits_BV[..., params.suppress_token_ids] = float("-inf")
    if params.greedy:
        return logits_BV.argmax(-1)
    scaled_BV = logits_BV.float() / params.temperature
    filtered_BV = filter_logits(scaled_BV, top_k=params.top_k, top_p=params.top_p)
    probs_BV = torch.softmax(filtered_BV, dim=-1)
    tokens_B = torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
    if greedy_B is not None:
        tokens_B = torch.where(greedy_B, logits_BV.argmax(-1), tokens_B)
    return tokens_B


def anchor_rows(rows_B: torch.Tensor, params: SamplingParams, group_size: int):
    """The greedy mask of ``rows_B`` (row r is sample r % group_size of its prompt), or None."""
    if not params.greedy_anchor or params.greedy:
        return None
    return rows_B % group_size == 0


def chosen_token_logprobs(
    logits_BV: torch.Tensor, tokens_B: torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    """logp_B of ``tokens_B`` under softmax(logits / temperature) (plain softmax when greedy)."""
    scale = params.temperature if params.temperature > 0 else 1.0
    logp_BV = torch.log_softmax(logits_BV.float() / scale, dim=-1)
    return logp_BV.gather(-1, tokens_B.unsqueeze(-1)).squeeze(-1)
