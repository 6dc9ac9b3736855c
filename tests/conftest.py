"""Shared pytest setup: the ``gpu`` marker skips without CUDA; tests never touch the network."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def single_rank():
    """A one-rank gloo/NCCL process group with Megatron's groups, for one test module."""
    from megatron_vcap.parallel.config import ParallelConfig
    from megatron_vcap.parallel.multiprocess import find_free_port
    from megatron_vcap.parallel.runtime import destroy_distributed, init_distributed

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(find_free_port()),
    )
    yield init_distributed(ParallelConfig(), seed=3)
    destroy_distributed()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
