"""The CPU demo, the project's main job: ``vcap demo --out DIR``.

On a fresh machine, no downloads, no GPU: make synthetic videos with exact captions/structures/
events and a tiny tokenizer, build a tiny Qwen2.5-VL-architecture model directory, run a short
SFT warm start and then GRPO with the embedded judge (each on 2 gloo ranks, launched exactly as a
user launches training: ``torchrun -m megatron_vcap train``), evaluate the SFT and GRPO
checkpoints on held-out videos with greedy decoding, export the GRPO result to Hugging Face
format (``<out>/hf``, loadable with ``AutoProcessor`` + ``AutoModelForImageTextToText``), print
a before/after table and the training reward's trend, and write the plot. Every stage goes through the same code paths as a real run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path


@dataclass
class DemoSettings:
    # More videos than GRPO's 180 x 4 prompts, so that they are all fresh ones: with 160, each
    # was seen ~4 times and the training reward rose on answers memorised for those videos while
    # the held-out greedy score fell in 2 of 5 runs.
    num_train: int = 800
    num_eval: int = 48
    sft_steps: int = 150
    # Most of the rise comes in the first ~60 steps; 180 steps fit the 10-minute budget on a
    # 2-core machine where one GRPO step takes ~2.2 s.
    grpo_steps: int = 180
    sft_lr: float = 2e-3
    # Adam's first steps move every weight by ~lr whatever the gradient's size: without a warmup
    # the KL to the SFT policy rose to ~0.19 within 12 steps and the caption reward fell for
    # the next 100 (one run at lr 8e-5); 20 warmup steps keep the start near the SFT policy.
    # At a constant lr after that, one run of five peaked at step ~120 and fell back (KL 0.22);
    # a cosine decay to lr / 10 slows the policy down once the reward has risen.
    grpo_lr: float = 5e-5
    grpo_warmup_steps: int = 20
    # Rollout temperature of the GRPO stage. The tiny model hardly reads the video (its greedy
    # answers on held-out clips are a handful of near-constant texts), so what GRPO can improve
    # is the answer greedy decoding gives; sampling near that answer (T = 0.5) moved the held-out
    # greedy score up where T = 1.0 moved the sampled reward but not the greedy one.
    grpo_temperature: float = 0.5
    # One greedy sample per group (grpo.greedy_anchor): the held-out score is of greedy answers,
    # and a greedy answer can fail where the T = 0.5 samples never do (a repetition loop up to
    # max_new_tokens, no closing tag: format 0; 17 of 48 held-out clips in one earlier run).
    greedy_anchor: bool = True
    nproc: int = 2
    seed: int = 0
    # Tiny model: hidden size, LM layers, vision depth.
    hidden: int = 128
    layers: int = 3
    vision_depth: int = 2


def recipe_path() -> Path:
    return Path(str(resources.files("megatron_vcap.recipes") / "demo_cpu.yaml"))


def build_model_dir(out: Path, tokenizer_dir: Path, s: DemoSettings) -> Path:
    """A Hugging Face-style model directory: tiny Qwen2.5-VL config, the synthetic tokenizer and
    the processor files (the recipe's pixel limits), so exports load with ``AutoProcessor``."""
    import yaml
    from transformers import AutoTokenizer

    from megatron_vcap.convert.hf_io import save_processor_files
    from megatron_vcap.data.tokens import special_token_ids
    from megatron_vcap.models.presets import tiny_hf_config

    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(tokenizer_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = special_token_ids(tok)
    config = tiny_hf_config(
        "qwen2_5_vl",
        vocab_size=len(tok),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        text_bos_token_id=ids["<|endoftext|>"],
        text_eos_token_id=ids["<|im_end|>"],
        text_hidden_size=s.hidden,
        text_intermediate_size=2 * s.hidden,
        text_num_hidden_layers=s.layers,
        # head_dim 16: the preset mrope_section [2, 3, 3] fits.
        text_num_attention_heads=s.hidden // 16,
        text_num_key_value_heads=2,
        vision_depth=s.vision_depth,
        vision_hidden_size=64,
        vision_intermediate_size=128,
        vision_num_heads=4,
        vision_fullatt_block_indexes=[s.vision_depth - 1],
    )
    config.save_pretrained(str(model_dir))
    data = yaml.safe_load(recipe_path().read_text())["data"]
    save_processor_files(
        model_dir, config, min_pixels=data["min_pixels"], max_pixels=data["max_pixels"]
    )
    return model_dir


def _run(cmd: list[str], log_path: Path) -> float:
    """Run a stage, streaming its output to the console and a log file; returns seconds."""
    start = time.perf_counter()
    print(f"$ {' '.join(cmd)}", flush=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
    }
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        for line in proc.stdout:
            log_file.write(line)
            if line.startswith("[") or "error" in line.lower() or "Traceback" in line:
                print("  " + line.rstrip(), flush=True)
        code = proc.wait()
    if code != 0:
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"stage failed (exit {code}); log {log_path}:\n{tail}")
    return time.perf_counter() - start


def _torchrun(nproc: int, args: list[str]) -> list[str]:
    from megatron_vcap.parallel.multiprocess import find_free_port

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={find_free_port()}",
        "-m",
        "megatron_vcap",
        *args,
    ]


COMPONENTS = (  # (metrics key suffix, label)
    ("total", "total"),
    ("format", "format"),
    ("think", "think (Tscore)"),
    ("caption", "caption (Escore)"),
)


def load_reward_series(metrics_file: Path) -> dict[str, list[float]]:
    """Per-step mean training reward of each component from a GRPO ``metrics.jsonl``."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    series = {"step": [r["step"] for r in rows]}
    for key, _ in COMPONENTS:
        series[key] = [r.get(f"reward/{key}_mean", float("nan")) for r in rows]
    return series


def compute_trend(values: list[float]) -> dict[str, float]:
    """Last quarter's mean minus first quarter's, in standard errors of that difference.

    The per-step values of each quarter are taken as independent draws (each is already a mean
    over the step's samples); se = sqrt(var_first / n + var_last / n) with sample variances.
    """
    import statistics

    n = len(values) // 4
    if n < 2:
        return {"first": float("nan"), "last": float("nan"), "diff": float("nan"),
                "se": float("nan"), "z": float("nan"), "quarter_steps": n}  # fmt: skip
    first, last = values[:n], values[-n:]
    diff = statistics.fmean(last) - statistics.fmean(first)
    se = (statistics.variance(first) / n + statistics.variance(last) / n) ** 0.5
    z = diff / se if se > 0 else float("inf") * (1 if diff > 0 else -1 if diff < 0 else 0)
    return {"first": statistics.fmean(first), "last": statistics.fmean(last), "diff": diff,
            "se": se, "z": z, "quarter_steps": n}  # fmt: skip


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def reward_curve_png(metrics_file: Path, out_png: Path, before: dict, after: dict) -> None:
    """Left: per-step training reward per component, raw (faint) and a moving average. Right:
    held-out greedy scores of the SFT and SFT + GRPO checkpoints per component."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = load_reward_series(metrics_file)
    steps = series["step"]
    window = max(3, len(steps) // 10)
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=(3, 2))
    for i, (key, label) in enumerate(COMPONENTS):
        color = f"C{i}"
        ax.plot(steps, series[key], color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, moving_average(series[key], window), color=color, linewidth=2, label=label)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean training reward")
    ax.set_title(f"training reward (faint: per step; bold: {window}-step moving average)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    width = 0.38
    xs = range(len(COMPONENTS))
    for offset, (name, scores) in ((-width / 2, ("SFT", before)),
                                   (width / 2, ("SFT + GRPO", after))):  # fmt: skip
        heights = [scores[key] for key, _ in COMPONENTS]
        drawn = bars.bar([x + offset for x in xs], heights, width, label=name)
        bars.bar_label(drawn, fmt="%.2f", fontsize=7)
    bars.set_xticks(list(xs), [label.split(" ")[0] for _, label in COMPONENTS])
    bars.set_ylabel("held-out score (greedy)")
    bars.set_title("held-out: SFT vs SFT + GRPO")
    bars.grid(alpha=0.3, axis="y")
    bars.legend(fontsize=8)
    fig.suptitle("megatron_vcap demo")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def format_trends(trends: dict[str, dict]) -> str:
    lines = [f"{'training reward':<20}{'first 1/4':>10}{'last 1/4':>10}{'change':>9}{'z':>7}"]
    for key, label in COMPONENTS:
        t = trends[key]
        lines.append(f"{label.split(' ')[0]:<20}{t['first']:>10.3f}{t['last']:>10.3f}"
                     f"{t['diff']:>+9.3f}{t['z']:>7.1f}")  # fmt: skip
    n = trends["total"]["quarter_steps"]
    lines.append(f"(z: change / its standard error over the {n} steps of each quarter)")
    return "\n".join(lines)


def format_table(before: dict, after: dict) -> str:
    lines = [f"{'held-out (greedy)':<20}{'format':>9}{'Tscore':>9}{'Escore':>9}{'total':>9}"]
    for name, s in (("SFT", before), ("SFT + GRPO", after)):
        lines.append(
            f"{name:<20}{s['format']:>9.3f}{s['think']:>9.3f}{s['caption']:>9.3f}{s['total']:>9.3f}"
        )
    delta = {k: after[k] - before[k] for k in ("format", "think", "caption", "total")}
    lines.append(
        f"{'change':<20}{delta['format']:>+9.3f}{delta['think']:>+9.3f}"
        f"{delta['caption']:>+9.3f}{delta['total']:>+9.3f}"
    )
    return "\n".join(lines)


def _train(s: DemoSettings, common: list[str], run_dir: Path, log: Path, *overrides) -> float:
    """One ``vcap train`` stage under torchrun on ``s.nproc`` gloo ranks; returns seconds."""
    args = ["train", "--config", str(recipe_path()), *common, f"train.run_dir={run_dir}"]
    return _run(_torchrun(s.nproc, [*args, *overrides]), log)


def _evaluate(s: DemoSettings, ckpt: Path, manifest: Path, out_json: Path, log: Path) -> float:
    """``vcap eval reward`` of one checkpoint on the held-out manifest; returns seconds."""
    args = ["eval", "reward", "--config", str(recipe_path()), "--ckpt", str(ckpt),
            "--manifest", str(manifest), "--out", str(out_json)]  # fmt: skip
    return _run(_torchrun(s.nproc, args), log)


# What a demo writes under its output directory (the rest of it is left alone).
STAGE_OUTPUTS = ("data", "model", "sft", "grpo", "hf", "logs")


def claim_out_dir(out: Path, s: DemoSettings) -> bool:
    """Make ``out`` hold the demo of settings ``s``; returns whether an earlier run was cleared.

    Rerunning with the same settings resumes (each stage continues from its last checkpoint,
    a finished one is skipped). A directory left by other settings (another seed, size, step
    count) or by a run that recorded none has its demo outputs removed: its checkpoints would
    otherwise be resumed against the new data."""
    record = out / "demo_settings.json"
    settings = asdict(s)
    previous = None
    if record.exists():
        try:
            previous = json.loads(record.read_text())
        except ValueError:
            previous = None
    stale = previous != settings and any((out / name).exists() for name in STAGE_OUTPUTS)
    if stale:
        print(f"[demo] {out} holds a demo run with other settings: starting afresh", flush=True)
        for name in STAGE_OUTPUTS:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=2))
    return stale


def run_demo(out: Path, s: DemoSettings) -> dict:
    from megatron_vcap.trainer.run_logging import setup_run_logging

    claim_out_dir(out, s)
    # This process's own library records and warnings go to <out>/logs/demo.log; each stage's
    # console goes to <out>/logs/<stage>.log (and its full record to <stage dir>/logs/).
    run_logging = setup_run_logging(out, 0, verbose=False, file_name="demo.log")
    try:
        return _run_stages(out, s)
    finally:
        run_logging.close()


def _run_stages(out: Path, s: DemoSettings) -> dict:
    from megatron_vcap.data.synth import make_synthetic_dataset

    t_start = time.perf_counter()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[demo] synthetic data: {s.num_train} train + {s.num_eval} held-out videos", flush=True)
    total = s.num_train + s.num_eval
    data = make_synthetic_dataset(out / "data", total, seed=s.seed,
                                  eval_fraction=s.num_eval / total, workers=s.nproc)  # fmt: skip
    model_dir = build_model_dir(out, data.tokenizer_dir, s)
    common = [f"model.hf_path={model_dir}", f"data.train_manifest={data.train_manifest}",
              f"data.eval_manifest={data.eval_manifest}", "checkpoint.load=auto"]  # fmt: skip
    timings = {}

    print(f"[demo] SFT warm start: {s.sft_steps} steps on {s.nproc} ranks", flush=True)
    timings["sft"] = _train(
        s, common, out / "sft", logs / "sft.log", "train.mode=sft",
        f"train.steps={s.sft_steps}", f"train.lr={s.sft_lr}", "train.warmup_steps=5",
        "train.lr_schedule=cosine", f"train.min_lr={s.sft_lr / 10}",
    )  # fmt: skip
    sft_ckpt = _final_checkpoint(out / "sft")
    print(f"[demo] GRPO: {s.grpo_steps} steps on {s.nproc} ranks", flush=True)
    timings["grpo"] = _train(
        s, common, out / "grpo", logs / "grpo.log", "train.mode=grpo",
        f"train.steps={s.grpo_steps}", f"train.lr={s.grpo_lr}",
        f"train.warmup_steps={_grpo_warmup(s)}", "train.lr_schedule=cosine",
        f"train.min_lr={s.grpo_lr / 10}", f"checkpoint.pretrained={sft_ckpt}",
        f"rollout.temperature={s.grpo_temperature}", f"grpo.greedy_anchor={s.greedy_anchor}",
    )  # fmt: skip
    checkpoints = {"sft": sft_ckpt, "grpo": _final_checkpoint(out / "grpo")}

    results = {}
    for name, ckpt in checkpoints.items():
        print(f"[demo] evaluating the {name.upper()} checkpoint on held-out videos", flush=True)
        path = out / f"eval_{name}.json"
        timings[f"eval_{name}"] = _evaluate(s, ckpt, data.eval_manifest, path,
                                            logs / f"eval_{name}.log")  # fmt: skip
        results[name] = json.loads(path.read_text())["summary"]

    hf_out = out / "hf"
    print(f"[demo] exporting the GRPO checkpoint to Hugging Face format: {hf_out}", flush=True)
    timings["export"] = _export(checkpoints["grpo"], hf_out)

    metrics_file = out / "grpo" / "metrics.jsonl"
    trends = {key: compute_trend(v) for key, v in load_reward_series(metrics_file).items()
              if key != "step"}  # fmt: skip
    plot = out / "reward_curve.png"
    reward_curve_png(metrics_file, plot, results["sft"], results["grpo"])
    timings["total"] = time.perf_counter() - t_start
    summary = {"sft": results["sft"], "grpo": results["grpo"], "seconds": timings,
               "gain_total": results["grpo"]["total"] - results["sft"]["total"],
               "training_trend": trends, "hf_export": str(hf_out),
               "settings": asdict(s)}  # fmt: skip
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + format_table(results["sft"], results["grpo"]))
    print("\n" + format_trends(trends))
    print(f"\nplot: {plot}\nHugging Face export: {hf_out}\nsummary: {out / 'demo_summary.json'}")
    print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()), flush=True)
    return summary


def _grpo_warmup(s: DemoSettings) -> int:
    """The GRPO warmup, at most a quarter of the steps: a scaled-down run (``--grpo-steps 8``)
    still reaches its learning rate."""
    return min(s.grpo_warmup_steps, s.grpo_steps // 4)


def _export(ckpt: Path, hf_out: Path) -> float:
    """``vcap convert mcore-to-hf`` of ``ckpt`` (in this process); returns seconds."""
    from megatron_vcap.convert.mcore_to_hf import convert_mcore_to_hf

    start = time.perf_counter()
    print(f"$ vcap convert mcore-to-hf --ckpt {ckpt} --out {hf_out}", flush=True)
    if hf_out.exists():
        shutil.rmtree(hf_out)
    convert_mcore_to_hf(ckpt, hf_out, progress=False)
    return time.perf_counter() - start


def _final_checkpoint(run_dir: Path) -> Path:
    from megatron_vcap.trainer.checkpointing import find_latest

    ckpt = find_latest(run_dir / "checkpoints")
    if ckpt is None:
        raise RuntimeError(f"{run_dir}: the run finished without a checkpoint")
    return ckpt
