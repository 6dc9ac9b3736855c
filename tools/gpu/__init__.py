"""The GPU kit: every GPU check and benchmark of megatron_vcap in one prepared command.

``tools/gpu/prepare.sh`` (no GPU needed) downloads the Python 3.12 wheels a bare GPU machine
lacks and writes the fixtures into ``.gpu_kit/``; ``tools/gpu/run.sh`` (on the GPU machine)
installs them into a target directory and runs the sections of :mod:`tools.gpu.kit` (pytest -m
gpu, bf16 parity, GRPO/SFT steps through ``vcap train``, MFU, decode vs the HBM bound, rollout
speed), each in its own process under a time limit, writing ``report.json`` and ``report.md``.
``run.sh --dry-run`` runs the same sections on CPU with tiny shapes (a default test does).
"""
