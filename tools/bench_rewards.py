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
4. Parser on adversarial responses (``--parse-only`` runs just this): for each size in
   ``--parse-chars`` and each shape (whitespace runs after ``<`` and after "Subject", thousands
   of "Subject N" lines, many unclosed and nested tags, long marker runs), the seconds one
   ``parse_response`` takes, against the target of 50 ms per 100k characters. The baseline is a
   well-formed response of the same size parsed in the same process (ratio adversarial / plain:
   a linear parser stays near 1x; the regex parser of issue 14 took 65 s at 64k).

Usage: ``python tools/bench_rewards.py [--n 512] [--latency 0.2] [--concurrency 64]
[--skip-judge] [--skip-tscore] [--skip-embedded] [--parse-only] [--parse-chars 64000,100000]
[--parse-repeats 3]``
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
    p.add_argument("--parse-only", action="store_true", help="only the adversarial parser bench")
    p.add_argument("--parse-chars", default="16000,64000,100000",
                   help="comma-separated response sizes for the parser bench")  # fmt: skip
    p.add_argument("--parse-repeats", type=int, default=3,
                   help="parses per shape, the fastest counts (1 for a slow baseline parser)")  # fmt: skip
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


# ------------------------------------------------------------------ 4. adversarial parsing
def _fit(text: str, chars: int) -> str:
    return text[:chars] if len(text) >= chars else text + " " * (chars - len(text))


def adversarial_responses(chars: int) -> dict[str, str]:
    """Responses of exactly ``chars`` characters in the shapes that made the regex parser slow."""
    head = "<think>\nSubject 1: a dog\nAttributes: brown\nActions: runs\n"
    tail = "</think>\n<answer>A dog runs.</answer>"
    body = chars - len(head) - len(tail)
    plain, i = head, 2
    while len(plain) < chars // 2:  # well formed, then padded with blank lines
        plain += f"Subject {i}: a dog {i}\nAttributes: brown; long tail\nActions: runs; barks\n"
        i += 1
    return {
        "plain (baseline)": _fit(plain + "\n", chars - len(tail)) + tail,
        "'<' + whitespace": head + "<" + " " * (body - 1) + tail,
        "'< /' + whitespace": head + "<" + " " * (body // 2) + "/" + " " * (body - body // 2 - 2) + tail,
        "'Subject' + whitespace": head + "Subject" + " " * (body - 8) + "x" + tail,
        "'Subject #' + tabs": head + "Subject #" + "\t" * (body - 10) + "x" + tail,
        "'Attributes' + spaces": head + "Attributes" + " " * (body - 11) + "x" + tail,
        "'Subject N' lines": head + _fit("".join(f"Subject {i}\n" for i in range(chars)), body) + tail,
        "unclosed tags": _fit("<think><answer>" * chars, chars),
        "nested '<<<'": _fit("<" * chars, chars),
        "marker run": head + "-" * (body - 1) + "x" + tail,
    }  # fmt: skip


def bench_parse(args) -> None:
    from megatron_vcap.rewards.parser import parse_response

    for chars in [int(c) for c in args.parse_chars.split(",") if c.strip()]:
        shapes = adversarial_responses(chars)
        times = {}
        for name, text in shapes.items():
            assert len(text) == chars, (name, len(text))
            best = float("inf")
            for _ in range(args.parse_repeats):  # best of N: the machine's noise, not the parser's
                start = time.perf_counter()
                failure = parse_response(text).failure
                best = min(best, time.perf_counter() - start)
            times[name] = best
            print(f"  {chars:7d} chars  {name:24s} {times[name] * 1000:10.1f} ms  ({failure})")
        worst = max(times, key=times.get)
        base = max(times["plain (baseline)"], 1e-6)
        target = 0.05 * chars / 100_000
        print(f"  {chars:7d} chars  worst: {worst} {times[worst] * 1000:.1f} ms = "
              f"{times[worst] / base:.1f}x the plain response, {times[worst] / target:.2f}x the "
              f"target ({target * 1000:.0f} ms)")  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.parse_only:
        print(f"[4] parser on adversarial responses of {args.parse_chars} characters")
        bench_parse(args)
        return
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
    print(f"[4] parser on adversarial responses of {args.parse_chars} characters")
    bench_parse(args)


if __name__ == "__main__":
    main()
