"""KV-cached generation on a tiny random mRoPE GPTModel against full-recompute decoding.

The oracle runs the model on the whole sequence again for every new token (no cache, one prompt
at a time, no padding); KV-cached greedy decoding must pick exactly the same tokens, in both
cache layouts, with and without group-prefix sharing. Prompts carry a video-like block of 3-D
mRoPE positions and a nonzero rope delta, as Qwen-VL prompts do.
"""

from __future__ import annotations

import pytest
import torch

from megatron_vcap.config.loader import ConfigError
from megatron_vcap.rollout.generate import check_generation_parallelism, generate
from megatron_vcap.rollout.sampling import SamplingParams
from megatron_vcap.rollout.types import PromptSpec
from megatron_vcap.testing.tiny_gpt import TinyGPTConfig, build_tiny_mrope_gpt

VOCAB = 96


def video_prompt(ids, text_before, grid):
    """A prompt whose tokens [text_before, text_before + t*h*w) are a video block (HF layout)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    t, h, w = grid
    pos = torch.zeros(3, ids.numel(), dtype=torch.long)
    pos[:, :text_before] = torch.arange(text_before)
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    end = text_before + t * h * w
    for axis, grid_ids in enumerate((tt, hh, ww)):
        pos[axis, text_before:end] = text_before + grid_ids.flatten()
    start = int(pos[:, :end].max()) + 1
    pos[:, end:] = torch.arange(start, start + ids.numel() - end)
    rope_delta = int(pos.max()) + 1 - ids.numel()
    return PromptSpec(ids, pos, rope_delta)


def recompute_decode(model, prompt, max_new, eos=()):
    """Oracle: greedy decoding recomputing the full sequence every step; returns tokens, logp."""
    ids, pos = prompt.input_ids_S.clone(), prompt.position_ids_3S.clone()
    out, logps = [], []
    with torch.no_grad():
        for i in range(max_new):
            logits = model(ids[None], pos[:, None], None)[0, -1].float()
            token = int(logits.argmax())
            out.append(token)
            logps.append(float(torch.log_softmax(logits, -1)[token]))
            if token in eos:
                break
            ids = torch.cat([ids, torch.tensor([token])])
            pos = torch.cat([pos, prompt.response_position_ids_3R(i + 1)[:, -1:]], dim=1)
    return out, logps


@pytest.fixture(scope="module")
def model(single_rank):
    torch.manual_seed(3)
    return build_tiny_mrope_gpt(TinyGPTConfig(vocab_size=VOCAB))


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(11)
    return [
        video_prompt(torch.randint(0, VOCAB, (17,), generator=g), 3, (2, 2, 3)),
        PromptSpec.from_text_ids(torch.randint(0, VOCAB, (5,), generator=g)),
        video_prompt(torch.randint(0, VOCAB, (26,), generator=g), 2, (2, 3, 3)),
    ]


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)


@pytest.fixture(scope="module")
def oracle(model, prompts):
    return [recompute_decode(model, p, GREEDY.max_new_tokens) for p in prompts]


@pytest.mark.parametrize("kv_layout", ["left_pad", "aligned"])
def test_kv_cached_greedy_equals_full_recompute(model, prompts, oracle, kv_layout):
    assert prompts[0].rope_delta < 0  # the video block compresses positions, as in Qwen-VL
    outs = generate(model, prompts, sampling=GREEDY, kv_layout=kv_layout, return_logprobs=True)
    for out, (tokens, logps) in zip(outs, oracle):
        assert out.response_ids_R.tolist() == tokens, (kv_layout, out.prompt_index)
        assert out.finish_reason == "length"
        torch.testing.assert_close(out.logprobs_R, torch.tensor(logps), atol=1e-5, rtol=0)
    # Different prompts give different continuations: the check above is not trivially met.
    assert len({tuple(t) for t, _ in oracle}) == len(oracle)


@pytest.mark.parametrize("kv_layout", ["left_pad", "aligned"])
def test_prefix_sharing_gives_the_same_greedy_tokens(model, prompts, oracle, kv_layout):
    kw = dict(sampling=GREEDY, group_size=3, kv_layout=kv_layout)
    shared = generate(model, prompts, share_prefix=True, **kw)
    copies = generate(model, prompts, share_prefix=False, **kw)
    assert [(o.prompt_index, o.sample_index) for o in shared] == [
        (p, g) for p in range(3) for g in range(3)
    ]
    for a, b in zip(shared, copies):
        assert a.response_ids_R.tolist() == b.response_ids_R.tolist()
        assert a.response_ids_R.tolist() == oracle[a.prompt_index][0]


def test_sampling_is_reproducible_and_top_k_1_is_greedy(model, prompts, oracle):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8)
    a = generate(model, prompts, sampling=params, group_size=4, seed=5)
    b = generate(model, prompts, sampling=params, group_size=4, seed=5)
    c = generate(model, prompts, sampling=params, group_size=4, seed=6)
    ids = [[o.response_ids_R.tolist() for o in outs] for outs in (a, b, c)]
    assert ids[0] == ids[1]
    assert ids[0] != ids[2]
    # The G samples of a group differ (they are independent draws from one shared prefix).
    assert len({tuple(x) for x in ids[0][:4]}) > 1
    top1 = SamplingParams(temperature=0.7, top_k=1, max_new_tokens=GREEDY.max_new_tokens)
    outs = generate(model, prompts, sampling=top1, seed=1)
    assert [o.response_ids_R.tolist() for o in outs] == [t for t, _ in oracle]


@pytest.mark.parametrize("kv_layout", ["left_pad", "aligned"])
def test_greedy_anchor_decodes_the_first_sample_of_each_group_greedily(
    model, prompts, oracle, kv_layout
):
    """grpo.greedy_anchor: sample 0 of every group is the argmax decode; the others are the
    draws the same seed gives without the anchor (every row draws and, with no stops, every
    step draws for the same rows, so the generator's stream is the same)."""
    n = GREEDY.max_new_tokens
    plain = SamplingParams(temperature=1.0, max_new_tokens=n)
    anchored = SamplingParams(temperature=1.0, max_new_tokens=n, greedy_anchor=True)
    kw = dict(group_size=3, seed=3, kv_layout=kv_layout, return_logprobs=True)
    a = generate(model, prompts, sampling=anchored, **kw)
    b = generate(model, prompts, sampling=plain, **kw)
    assert [o.response_ids_R.tolist() for o in a if o.sample_index == 0] == [t for t, _ in oracle]
    sampled_a = [o.response_ids_R.tolist() for o in a if o.sample_index > 0]
    sampled_b = [o.response_ids_R.tolist() for o in b if o.sample_index > 0]
    assert sampled_a == sampled_b
    assert sampled_a[: len(prompts)] != [t for t, _ in oracle]  # the rest do sample
    # The anchor's log-probs are at the sampling temperature, as the trainer scores them.
    greedy_logp = generate(model, prompts, sampling=SamplingParams(temperature=0.0, max_new_tokens=n),
                           seed=3, kv_layout=kv_layout, return_logprobs=True)  # fmt: skip
    for o, g in zip([o for o in a if o.sample_index == 0], greedy_logp):
        torch.testing.assert_close(o.logprobs_R, g.logprobs_R)


def test_eos_stop_strings_and_stop_tokens_end_sequences(model, prompts, oracle):
    tokens0 = oracle[0][0]
    eos = tokens0[3]
    first = tokens0.index(eos)  # the earliest occurrence ends it
    outs = generate(model, prompts[:1], sampling=SamplingParams(
        temperature=0.0, max_new_tokens=10, eos_token_ids=[eos]))  # fmt: skip
    assert outs[0].response_ids_R.tolist() == tokens0[: first + 1]
    assert outs[0].finish_reason == "eos"

    # Text is one letter per token id; the stop string spans tokens 4 and 5 of prompt 0.
    def decode(ids):
        return "".join(chr(65 + (i % 50)) for i in ids)

    stop = decode(tokens0[4:6])
    expected_end = decode(tokens0).index(stop) + len(stop)
    params = SamplingParams(temperature=0.0, max_new_tokens=10, stop_strings=[stop])
    outs = generate(model, prompts, sampling=params, decode_fn=decode)
    assert outs[0].finish_reason == "stop"
    assert outs[0].response_ids_R.tolist() == tokens0[:expected_end]
    for out, (tokens, _) in zip(outs[1:], oracle[1:]):  # other rows go on unaffected
        got = out.response_ids_R.tolist()
        assert got == tokens[: len(got)]
        assert (out.finish_reason == "stop") == (stop in decode(got))

    tokens2 = oracle[2][0]
    params = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=[tokens2[1:3]])
    out = generate(model, prompts[2:], sampling=params)[0]
    assert out.finish_reason == "stop" and out.response_ids_R.tolist() == tokens2[:3]
    with pytest.raises(ValueError, match="decode_fn"):
        generate(model, prompts, sampling=SamplingParams(stop_strings=["x"]))


def test_unsupported_parallel_layouts_are_rejected():
    class Fake(torch.nn.Module):
        def __init__(self, **cfg):
            super().__init__()
            self.config = type("C", (), cfg)()

    with pytest.raises(ConfigError, match="PP=2; pass its pp_group"):
        check_generation_parallelism(Fake(pipeline_model_parallel_size=2), None)
    with pytest.raises(ConfigError, match="sequence_parallel"):
        check_generation_parallelism(Fake(sequence_parallel=True), None)
    with pytest.raises(ConfigError, match="tp_group"):
        check_generation_parallelism(Fake(tensor_model_parallel_size=2), None)


def test_sampler_logprobs_equal_trainer_logprobs_over_the_train_batch(model, prompts):
    """Generation -> Rollout -> TrainBatch -> full forward: the response positions the trainer
    sees continue the prompt's mRoPE ids exactly as decoding did. Rows end at different steps
    (EOS), so finished rows linger in the batch and the cache is compacted mid-generation."""
    from megatron_vcap.rl.losses import compute_sequence_logprobs
    from megatron_vcap.rl.records import Rollout, build_train_batch

    # T != 1 (with top-k / top-p filtering on): both sides must divide the logits by T; the
    # sampler's log-prob is of the tempered, unfiltered distribution, as the trainer's is.
    for kv_layout, temperature in (("left_pad", 1.0), ("aligned", 1.0), ("aligned", 0.6)):
        params = SamplingParams(
            temperature=temperature,
            max_new_tokens=12,
            eos_token_ids=list(range(8)),
            **({} if temperature == 1.0 else {"top_k": 20, "top_p": 0.95}),
        )
        outs = generate(model, prompts, sampling=params, group_size=3, seed=0,
                        return_logprobs=True, kv_layout=kv_layout)  # fmt: skip
        assert {o.finish_reason for o in outs} == {"eos", "length"}
        assert len({o.num_tokens for o in outs}) >= 4
        rollouts = [Rollout.from_generation(o, prompts[o.prompt_index], f"s{i}")
                    for i, o in enumerate(outs)]  # fmt: skip
        batch = build_train_batch(rollouts, prompts, torch.zeros(len(rollouts)))
        with torch.no_grad():
            logits = model(batch.tokens_BT, batch.position_ids_3BT, None)
        logp_BT, _ = compute_sequence_logprobs(logits, batch.tokens_BT, temperature=temperature)
        for b, r in enumerate(rollouts):
            trainer = logp_BT[b][batch.loss_mask_BT[b] > 0]
            torch.testing.assert_close(trainer, r.sampler_logp_R, atol=1e-5, rtol=0)


def test_sdpa_core_attention_decodes_like_the_local_one(model, prompts, oracle):
    torch.manual_seed(3)  # the fixture's seed: identical weights, only the attention core differs
    sdpa = build_tiny_mrope_gpt(TinyGPTConfig(vocab_size=VOCAB, core_attention="sdpa"))
    assert (
        type(sdpa.decoder.layers[0].self_attention.core_attention).__name__ == "CausalSDPAttention"
    )
    for (name, a), b in zip(model.state_dict().items(), sdpa.state_dict().values()):
        assert a is None or torch.equal(a, b), name
    for kv_layout in ("left_pad", "aligned"):
        outs = generate(sdpa, prompts, sampling=GREEDY, kv_layout=kv_layout, return_logprobs=True)
        for out, (tokens, logps) in zip(outs, oracle):
            assert out.response_ids_R.tolist() == tokens
            torch.testing.assert_close(out.logprobs_R, torch.tensor(logps), atol=1e-5, rtol=0)
