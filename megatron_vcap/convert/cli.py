"""``vcap convert``: Hugging Face <-> Megatron checkpoint conversion.

* ``vcap convert hf-to-mcore --hf DIR --out DIR [--tp N] [--pp M]``
* ``vcap convert mcore-to-hf --ckpt DIR --out DIR [--max-shard-size 5GB]``

Heavy imports stay inside the handlers so ``vcap --help`` stays fast.
"""

from __future__ import annotations

import re
import time

from megatron_vcap.config.loader import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1048576' -> bytes (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"--max-shard-size: cannot parse {text!r} (e.g. 5GB, 500MB)")
    scale = 1024 ** " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * scale)


def _hf_to_mcore(args) -> int:
    from megatron_vcap.convert.hf_to_mcore import convert_hf_to_mcore

    start = time.perf_counter()
    out = convert_hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp)
    print(
        f"wrote Megatron checkpoint {out} (TP={args.tp}, PP={args.pp}) in "
        f"{time.perf_counter() - start:.1f}s"
    )
    return 0


def _mcore_to_hf(args) -> int:
    from megatron_vcap.convert.mcore_to_hf import convert_mcore_to_hf

    start = time.perf_counter()
    out = convert_mcore_to_hf(args.ckpt, args.out, max_shard_bytes=parse_size(args.max_shard_size))
    print(f"wrote Hugging Face model {out} in {time.perf_counter() - start:.1f}s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert", help="Hugging Face <-> Megatron checkpoint conversion")
    conv = p.add_subparsers(dest="direction", metavar="DIRECTION")
    conv.required = True
    a = conv.add_parser("hf-to-mcore", help="HF model directory -> Megatron dist checkpoint")
    a.add_argument("--hf", required=True, help="HF model directory (config.json, safetensors)")
    a.add_argument("--out", required=True, help="checkpoint directory to write")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks doing the conversion")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks doing the conversion")
    a.set_defaults(func=_hf_to_mcore)
    b = conv.add_parser("mcore-to-hf", help="Megatron dist checkpoint -> HF model directory")
    b.add_argument("--ckpt", required=True, help="checkpoint directory (with hf/ assets inside)")
    b.add_argument("--out", required=True, help="HF model directory to write")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (5GB)")
    b.set_defaults(func=_mcore_to_hf)
