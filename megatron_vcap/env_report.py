"""``vcap env``: versions of the stack, CUDA availability and the layer spec that would be used."""

from __future__ import annotations

import importlib.metadata as md
import platform


def _version(dist_name: str) -> str:
    try:
        return md.version(dist_name)
    except md.PackageNotFoundError:
        return "not installed"


def transformer_engine_version() -> str | None:
    for name in ("transformer-engine", "transformer_engine", "transformer-engine-cu12"):
        v = _version(name)
        if v != "not installed":
            return v
    try:
        import transformer_engine  # noqa: F401  (NGC images install it without dist metadata)

        return getattr(transformer_engine, "__version__", "installed")
    except Exception:
        return None


def collect() -> dict[str, str]:
    import torch

    cuda = torch.cuda.is_available()
    te = transformer_engine_version()
    info = {
        "python": platform.python_version(),
        "megatron_vcap": _version("megatron_vcap"),
        "torch": torch.__version__,
        "megatron-core": _version("megatron-core"),
        "transformers": _version("transformers"),
        "transformer-engine": te or "not installed",
        "cuda available": str(cuda),
    }
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu count"] = str(torch.cuda.device_count())
    info["layer spec"] = (
        "transformer_engine" if (cuda and te) else "local (Megatron-Core local layers)"
    )
    return info


def run(args) -> int:
    for key, value in collect().items():
        print(f"{key:>20}: {value}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("env", help="print versions, CUDA availability and the layer spec in use")
    p.set_defaults(func=run)
