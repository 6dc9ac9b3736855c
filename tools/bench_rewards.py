"""Benchmark the reward path: judge concurrency, Tscore throughput, embedded-judge batch time.

1. Judge concurrency: N (default 512) responses scored through ``RewardService`` with the
   ``openai`` judge against the loopback chat-completions server (``testing.fake_openai``, run in
   its own process so its threads do not share our GIL) answering after a fixed latency
   (default 200 ms). Concurrency 64 vs one request at a time: wall times and their ratio
   (target >= 40x). Both runs are in this process, same server, same responses.
2. Tscore throughput on one core (this process pinned to one CPU, one torch thread): parsing +
   Tscore of N responses with the ``lexical`` and the ``embedding`` backend, responses/s, and the
   lexical / embedding ratio. Every predicted phrase is unique, so the embedding backend encodes
   all of them (only the ground truth repeats, as it does across a GRPO group).
3. Embedded judge: seconds per batch of 64 captions (step Escore), the CPU demo's judge.

Usage: ``python tools/bench_rewards.py [--n 512] [--latency 0.2] [--concurrency 64]
[--skip-judge] [--skip-tscore] [--skip-embedded]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=512, help="responses per measurement")
    p.add_argument("--latency", type=float, default=0.2, help="judge server latency, seconds")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--skip-judge", action="store_true")
    p.add_argument("--skip-tscore", action="store_true")
    p.add_argument("--skip-embedded", action="store_true")
    return p.parse_args(argv)


# ------------------------------------------------------------------ synthetic responses
NOUNS = [
    "woman",
    "man",
    "dog",
    "cat",
    "child",
    "bird",
    "car",
    "chef",
    "player",
    "dancer",
    "horse",
    "robot",
]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "grey", "orange", "purple"]
THINGS = [
    "coat",
    "hat",
    "scarf",
    "umbrella",
    "ball",
    "bag",
    "shirt",
    "dress",
    "helmet",
    "guitar",
    "book",
    "cup",
]
VERBS = [
    "walks",
    "runs",
    "jumps",
    "turns",
    "waves",
    "sits",
    "opens",
    "lifts",
    "throws",
    "catches",
    "climbs",
    "pushes",
]
PLACES = [
    "street",
    "park",
    "kitchen",
    "field",
    "stage",
    "room",
    "road",
    "beach",
    "table",
    "door",
    "hill",
    "fence",
]


def make_subject(rng: random.Random, tag: str):
    from megatron_vcap.structure import Subject

    noun = rng.choice(NOUNS)
    attrs = [f"{rng.choice(COLORS)} {rng.choice(THINGS)} {tag}" for _ in range(4)]
    acts = [f"{rng.choice(VERBS)} toward the {rng.choice(PLACES)} {tag}" for _ in range(4)]
    return Subject(f"a {rng.choice(COLORS)} {noun} {tag}", attrs, acts)


def make_requests(n: int, seed: int = 0):
    """n requests: 16 ground truths (3 subjects, 10 events), responses with unique phrasing."""
    from megatron_vcap.rewards.service import RewardRequest
    from megatron_vcap.structure import render_response

    rng = random.Random(seed)
    truths = []
    for g in range(16):
        subjects = [make_subject(rng, f"g{g}") for _ in range(3)]
        events = [f"The {s.description} {a}." for s in subjects for a in s.actions][:10]
        truths.append((" ".join(events), subjects, events))
    requests = []
    for i in range(n):
        caption_ref, subjects, events = truths[i % 16]
        pred = [make_subject(rng, f"r{i}") for _ in range(3)]
        caption = " ".join(rng.sample(events, 4)) + f" Sample {i}."
        requests.append(
            RewardRequest(f"s{i}", render_response(pred, caption), caption_ref, subjects, events)
        )
    return requests


# ------------------------------------------------------------------ 1. judge concurrency
def _serve(latency: float, conn) -> None:
    from megatron_vcap.testing.fake_openai import FakeOpenAIServer

    with FakeOpenAIServer(latency_s=latency) as server:
        conn.send(server.base_url)
        while conn.recv() == "cpu?":  # answer CPU-time queries until told to stop
            conn.send(time.process_time())


def bench_judge(args) -> None:
    from megatron_vcap.rewards.config import JudgeConfig, RewardConfig
    from megatron_vcap.rewards.service import RewardService

    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_serve, args=(args.latency, child), daemon=True)
    proc.start()
    base_url = parent.recv()
    requests = make_requests(args.n)
    times = {}
    try:
        for conc in (args.concurrency, 1):
            judge = JudgeConfig(kind="openai", base_url=base_url, model="bench", concurrency=conc,
                                timeout_s=30.0, api_key_env="VCAP_BENCH_NO_KEY")  # fmt: skip
            with RewardService(RewardConfig(), judge) as svc:
                # Warm-up outside the timing: imports, client set-up, connections.
                svc.score(make_requests(conc, seed=9))
                parent.send("cpu?")
                server_cpu = parent.recv()
                start, cpu = time.perf_counter(), time.process_time()
                results = svc.score(requests)
                times[conc] = time.perf_counter() - start
                cpu = time.process_time() - cpu
                parent.send("cpu?")
                server_cpu = parent.recv() - server_cpu
            failed = sum(r.failed for r in results)
            print(f"  concurrency {conc:3d}: {len(results)} responses in {times[conc]:7.2f} s "
                  f"({len(results) / times[conc]:7.1f} resp/s, {failed} failed; CPU s: client {cpu:.2f}, "
                  f"server {server_cpu:.2f})")  # fmt: skip
    finally:
        parent.send("stop")
        proc.join(timeout=10)
    ideal = args.concurrency
    # The concurrent run is latency-bound only while the client and server CPU per request fit in
    # the latency; on a loaded machine (check the load average) the ratio drops below ideal.
    print(
        f"  load average (1 min) after the runs: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"  speedup concurrency {args.concurrency} vs 1: {times[1] / times[args.concurrency]:.1f}x "
          f"(target >= 40x; latency-bound ideal {ideal:.0f}x)")  # fmt: skip


# ------------------------------------------------------------------ 2. Tscore throughput
def pin_one_core() -> str:
    import torch

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}, 1 torch thread"
    return "1 torch thread (no CPU pinning on this OS)"


def bench_tscore(args) -> None:
    from megatron_vcap.rewards.parser import parse_response
    from megatron_vcap.rewards.similarity import build_similarity
    from megatron_vcap.rewards.think import compute_tscore, texts_of

    print(f"  {pin_one_core()}")
    requests = make_requests(args.n, seed=1)
    rates = {}
    for backend in ("lexical", "embedding"):
        sim = build_similarity(backend)
        sim.prepare(["warm-up"])  # model load is not part of the throughput
        start = time.perf_counter()
        scores = []
        for i in range(0, len(requests), 64):  # the service's batching: one prepare per batch
            batch = requests[i : i + 64]
            parsed = [parse_response(r.response) for r in batch]
            sim.prepare(
                [
                    t
                    for r, p in zip(batch, parsed)
                    for t in texts_of(p.subjects) + texts_of(r.subjects)
                ]
            )
            for r, p in zip(batch, parsed):
                scores.append(
                    compute_tscore(
                        p.subjects, r.subjects, sim, subject_threshold=0.3, item_threshold=0.5
                    ).score
                )
        elapsed = time.perf_counter() - start
        rates[backend] = len(requests) / elapsed
        print(
            f"  {backend:9s}: {rates[backend]:8.1f} responses/s (mean Tscore {sum(scores) / len(scores):.3f})"
        )
    print(f"  lexical / embedding throughput: {rates['lexical'] / rates['embedding']:.1f}x")


# ------------------------------------------------------------------ 3. embedded judge
def bench_embedded() -> None:
    from megatron_vcap.rewards.config import JudgeConfig, RewardConfig
    from megatron_vcap.rewards.service import RewardService

    requests = make_requests(64 * 4, seed=2)
    with RewardService(RewardConfig(num_workers=2), JudgeConfig(kind="embedded")) as svc:
        svc.score(requests[:2])  # load the model
        per_batch = []
        for i in range(0, len(requests), 64):
            start = time.perf_counter()
            svc.score(requests[i : i + 64])
            per_batch.append(time.perf_counter() - start)
    print("  seconds per batch of 64: " + ", ".join(f"{t:.2f}" for t in per_batch)
          + f" (mean {sum(per_batch) / len(per_batch):.2f})")  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.skip_judge:
        print(
            f"[1] judge concurrency: {args.n} responses, server latency {args.latency * 1000:.0f} ms"
        )
        bench_judge(args)
    if not args.skip_embedded:
        print("[3] embedded judge (reward service, 2 worker threads)")
        bench_embedded()
    if not args.skip_tscore:  # last: it pins this process to one core
        print(f"[2] Tscore throughput on one core: {args.n} responses, 3 subjects x 8 items each")
        bench_tscore(args)


if __name__ == "__main__":
    main()
