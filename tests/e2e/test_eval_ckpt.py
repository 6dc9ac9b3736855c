"""``vcap eval dream1k --ckpt``: greedy captions of the demo's tiny model (a real Megatron
checkpoint) over synthetic PyAV videos through the batched KV-cached rollout engine, judged on a
loopback server; a rerun reuses the finished captions; 2 data-parallel ranks under torchrun
give the same captions as 1 (slow: two torchrun workers start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vcap.cli import main as vcap_main
from megatron_vcap.testing.fake_openai import FakeOpenAIServer
from tests.unit.evalkit import ScriptedJudge, dream_line, judge_flags, write_jsonl

NUM_VIDEOS = 5


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, single_rank):
    """Synthetic videos, DREAM-1K annotations over them, a tiny model's Megatron checkpoint."""
    from megatron_vcap.convert.checkpoint import save_model_checkpoint
    from megatron_vcap.data.synth import make_synthetic_dataset
    from megatron_vcap.demo.demo import DemoSettings, build_model_dir
    from megatron_vcap.models.config import ModelConfig
    from megatron_vcap.models.hf_config import load_hf_config
    from megatron_vcap.models.qwen_vl import build_qwen_vl_model

    root = tmp_path_factory.mktemp("evalckpt")
    data = make_synthetic_dataset(root / "data", NUM_VIDEOS, seed=3, width=64, height=48, fps=4,
                                  seconds=2.0)  # fmt: skip
    model_dir = build_model_dir(root, data.tokenizer_dir, DemoSettings(hidden=64, layers=2))
    model = build_qwen_vl_model(
        load_hf_config(model_dir), ModelConfig(params_dtype="fp32", transformer_impl="local")
    )
    ckpt = save_model_checkpoint(root / "ckpt", model, model_dir)
    manifest = [json.loads(x) for x in Path(data.manifest).read_text().splitlines()]
    videos = Path(data.videos_dir)
    subsets = ["youtube", "videvo"]
    ann = write_jsonl(root / "DREAM-1k.jsonl", [
        dream_line(i, subsets[i % 2], Path(m["video"]).name, m["caption"], m["events"][:3])
        for i, m in enumerate(manifest)
    ])  # fmt: skip
    return {"root": root, "ckpt": ckpt, "videos": videos, "ann": ann}


def _gen_flags(fx) -> list[str]:
    from megatron_vcap.demo.demo import recipe_path

    return ["--annotations", str(fx["ann"]), "--videos", str(fx["videos"]), "--ckpt",
            str(fx["ckpt"]), "--config", str(recipe_path()), "--max-new-tokens", "10",
            "--batch-size", "2"]  # fmt: skip


def _captions(out: Path) -> dict[str, str]:
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    return {r["id"]: r["caption"] for r in rows}


def test_ckpt_generation_judging_and_resume(tiny_ckpt, tmp_path):
    fx = tiny_ckpt
    out = tmp_path / "one"
    judge = ScriptedJudge(default=True)
    with FakeOpenAIServer(require_schema=False, answer=judge) as server:
        argv = ["eval", "dream1k", *_gen_flags(fx), *judge_flags(server, out)]
        assert vcap_main(argv) == 0
        res = json.loads((out / "results.json").read_text())
        assert res["num_samples"] == NUM_VIDEOS and res["failed"] == 0
        settings = res["settings"]
        assert settings["model"] == str(Path(fx["ckpt"]).resolve())
        assert (settings["max_new_tokens"], settings["max_frames"], settings["fps"]) == (10, 8, 2.0)
        assert settings["captions_reused"] == 0
        captions = _captions(out)
        assert len(captions) == NUM_VIDEOS
        assert len(set(captions.values())) > 1  # the tiny random model says different things
        records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
        assert [r["caption"] for r in records] == [captions[str(i)] for i in range(NUM_VIDEOS)]
        gen = [
            json.loads(x) for x in (out / "generation/part-dp000.jsonl").read_text().splitlines()
        ]
        assert all(g["num_frames"] == 4 and g["num_tokens"] <= 10 for g in gen)

        # Rerun after a kill that lost the last two captions: only those are generated again,
        # and the judge answers every already-asked prompt from its cache.
        part = out / "generation/part-dp000.jsonl"
        lines = part.read_text().splitlines()
        part.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:15])  # torn last write
        before = server.stats["requests"]
        assert vcap_main(argv) == 0
        again = json.loads((out / "results.json").read_text())
        assert again["settings"]["captions_reused"] == NUM_VIDEOS - 2
        assert _captions(out) == captions
        assert again["overall"] == res["overall"]
        assert server.stats["requests"] == before  # same captions -> same prompts -> cached


def test_ckpt_layout_checked_before_any_process_group(tiny_ckpt, tmp_path, capsys):
    fx = tiny_ckpt
    argv = ["eval", "predict", "dream1k", *_gen_flags(fx), "--out", str(tmp_path / "o")]
    assert vcap_main([*argv, "parallel.tensor_model_parallel_size=3"]) == 2
    assert "world size 1 is not divisible by tensor" in capsys.readouterr().err
    bad = tmp_path / "notackpt"
    bad.mkdir()
    argv[argv.index("--ckpt") + 1] = str(bad)
    assert vcap_main(argv) == 2
    assert "no hf/config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_vdc_ckpt_draws_each_type_instruction_from_its_pool(tiny_ckpt, tmp_path):
    import random

    fx = tiny_ckpt
    qa = tmp_path / "qa"
    qa.mkdir()
    names = sorted(p.stem for p in fx["videos"].glob("*.mp4"))[:2]
    for vtype in ("camera", "short"):
        write_jsonl(qa / f"{vtype}.jsonl", [
            {n: [{"question": f"{vtype} {n} q{j}", "answer": "a", "category": "c"}
                 for j in range(2)]} for n in names
        ])  # fmt: skip
    pools = {"camera": [f"Camera instruction {i}." for i in range(16)],
             "short": [f"Short instruction {i}." for i in range(16)]}  # fmt: skip
    (tmp_path / "pools.json").write_text(json.dumps(pools))
    out = tmp_path / "out"
    argv = ["eval", "vdc", "--qa-dir", str(qa), "--types", "camera,short", "--prompt-pools",
            str(tmp_path / "pools.json"), *_gen_flags(fx)[2:]]  # fmt: skip
    with FakeOpenAIServer(require_schema=False, answer=_VdcJudge()) as server:
        assert vcap_main([*argv, *judge_flags(server, out)]) == 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    for vtype in ("camera", "short"):
        rng = random.Random(0)
        got = [r["instruction"] for r in rows if r["type"] == vtype]
        assert got == [rng.choice(pools[vtype]) for _ in names]
    res = json.loads((out / "results.json").read_text())
    assert res["types"]["camera"]["n"] == 2 and res["by_aggregation"]["unbiased"]["types"]
    assert res["settings"]["max_new_tokens"] == 10


def test_carebench_ckpt_with_an_instruction_template_of_the_users(tiny_ckpt, tmp_path):
    fx = tiny_ckpt
    names = sorted(p.name for p in fx["videos"].glob("*.mp4"))[:3]
    ann = tmp_path / "CAREBENCH.json"
    ann.write_text(json.dumps([
        {"video": n, "caption": f"A thing {i} moves.", "events": [f"thing {i} moves"],
         "category": "Sports & Exercise"} for i, n in enumerate(names)
    ]))  # fmt: skip
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "carebench_instruction.txt").write_text("Tell me everything about this clip.\n")
    out = tmp_path / "out"
    argv = ["eval", "carebench", "--annotations", str(ann), "--templates", str(templates),
            *_gen_flags(fx)[2:]]  # fmt: skip
    with FakeOpenAIServer(require_schema=False, answer=ScriptedJudge(default=True)) as server:
        assert vcap_main([*argv, *judge_flags(server, out)]) == 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == names
    assert {r["instruction"] for r in rows} == {"Tell me everything about this clip."}
    res = json.loads((out / "results.json").read_text())
    assert res["num_samples"] == 3 and res["failed"] == 0
    assert set(res["action"]["categories"]) == {"Sports & Exercise"}
    assert res["settings"]["templates"] == str(templates)
    assert (out / "carebench.png").is_file()


class _VdcJudge:
    """Answers every VDC question with "x"; a verdict "yes" / 3 for questions ending in q0."""

    def __call__(self, body):
        user = body["messages"][-1]["content"]
        if user.startswith("Here is a description"):
            return "x"
        question = user.split("\n", 1)[0]
        return (
            "{'pred': 'yes', 'score': 3}"
            if question.endswith("q0")
            else "{'pred': 'no', 'score': 1}"
        )


@pytest.mark.slow
def test_two_data_parallel_ranks_give_the_same_captions_as_one(tiny_ckpt, tmp_path):
    """Batches differ (1 rank: [0, 1], [2, 3], [4]; 2 ranks: [0, 2], [4] and [1, 3])."""
    fx = tiny_ckpt
    out1 = tmp_path / "one"
    assert vcap_main(["eval", "predict", "dream1k", *_gen_flags(fx), "--out", str(out1)]) == 0
    captions = _captions(out1)
    assert len(captions) == NUM_VIDEOS and len(set(captions.values())) > 1
    dp2 = _torchrun_predict(fx, tmp_path / "dp2")
    assert _captions(dp2) == captions
    parts = sorted(p.name for p in (dp2 / "generation").glob("part-*.jsonl"))
    assert parts == ["part-dp000.jsonl", "part-dp001.jsonl"]
    assert json.loads((dp2 / "generation.json").read_text())["dp"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tensor", "pipeline"])
def test_model_parallel_generation_gives_the_same_captions(tiny_ckpt, tmp_path, layout):
    """The 1-rank checkpoint loaded at TP=2 or PP=2 (Megatron's dist-checkpoint reshards it);
    PP=2 also meets a last batch of one row, fewer than the stages."""
    fx = tiny_ckpt
    out1 = tmp_path / "one"
    assert vcap_main(["eval", "predict", "dream1k", *_gen_flags(fx), "--out", str(out1)]) == 0
    out2 = _torchrun_predict(fx, tmp_path / "mp2", f"parallel.{layout}_model_parallel_size=2")
    assert _captions(out2) == _captions(out1)
    settings = json.loads((out2 / "generation.json").read_text())
    assert (settings["tp"], settings["pp"], settings["dp"]) == (
        (2, 1, 1) if layout == "tensor" else (1, 2, 1)
    )
    assert [p.name for p in (out2 / "generation").glob("part-*.jsonl")] == ["part-dp000.jsonl"]


def _torchrun_predict(fx, out: Path, *overrides: str) -> Path:
    from megatron_vcap.parallel.multiprocess import find_free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={find_free_port()}", "-m", "megatron_vcap", "eval", "predict",
           "dream1k", *_gen_flags(fx), "--out", str(out), *overrides]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
