"""Kit helper ``env``: what the machine has (GPU, driver, versions, optional packages).

Informational: it has no checks, and its figures head the report so that a reader knows which
versions produced the numbers (the lent GPU machine's image differs from the dev machines').
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import subprocess

from tools.gpu.common import SectionContext, SectionResult

OPTIONAL = ("transformer_engine", "av", "decord", "openai", "wandb", "psutil")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version(module: str) -> str | None:
    """The installed version of an importable module, without importing it (wandb and TE
    take seconds to import); "present" when it has no distribution metadata (NGC's TE)."""
    if importlib.util.find_spec(module) is None:
        return None
    dist = {"av": "av", "transformer_engine": "transformer-engine"}.get(module, module)
    return _dist_version(dist) or "present"


def run(ctx: SectionContext) -> SectionResult:
    import torch

    res = SectionResult()
    fig = res.figures
    fig.update(
        python=platform.python_version(),
        machine=platform.machine(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        transformers=_version("transformers"),
        **{"megatron-core": _dist_version("megatron-core")},
    )
    for module in OPTIONAL:
        fig[module] = _version(module)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        fig.update(
            device=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                 "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            fig["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            fig["nvidia_smi"] = f"unavailable: {exc}"
    else:
        fig["device"] = f"cpu ({torch.get_num_threads()} threads)"
    res.check("torch imports", True)
    return res
