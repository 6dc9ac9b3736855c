"""When a sample is done: EOS token, stop token sequence, stop string in the decoded text, or
the length limit.

Stop strings are matched on text, because one string can be tokenised many ways. Decoding the
whole response every step would cost O(R^2); only a tail window of tokens is decoded, wide
enough that any stop string completed by the newest token lies inside it (a byte-level BPE
token decodes to at least one byte and a character takes at most four).
"""

from __future__ import annotations

from collections.abc import Callable

from megatron_vcap.rollout.sampling import SamplingParams
from megatron_vcap.rollout.types import FinishReason

DecodeFn = Callable[[list[int]], str]


class StopChecker:
    """Decides, after each new token, whether a response is finished and why."""

    def __init__(self, params: SamplingParams, decode_fn: DecodeFn | None = None):
        if params.stop_strings and decode_fn is None:
            raise ValueError(
                "stop_strings are set but no decode_fn (token ids -> text) was given to check them"
            )
        self.params = params
        self.decode_fn = decode_fn
        self.eos = set(params.eos_token_ids)
        self.window = max((4 * len(s.encode("utf-8")) + 4 for s in params.stop_strings), default=0)

    def check(self, response_ids: list[int]) -> FinishReason | None:
        """The finish reason after the last token of ``response_ids``, or None to go on."""
        if response_ids[-1] in self.eos:
            return "eos"
        for seq in self.params.stop_token_ids:
            if len(response_ids) >= len(seq) and response_ids[-len(seq) :] == list(seq):
                return "stop"
        if self.params.stop_strings:
            text = self.decode_fn(response_ids[-self.window :])
            if any(s in text for s in self.params.stop_strings):
                return "stop"
        if len(response_ids) >= self.params.max_new_tokens:
            return "length"
        return None
