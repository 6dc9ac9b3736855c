"""The local Slurm cluster for tests/slurm/ (one per session), or a skip with the reason.

Under ``CI=true`` a missing Slurm is a failure, not a skip: CI installs it (``.ci/run``).
"""

from __future__ import annotations

import os

import pytest

from tests.slurm.cluster import LocalSlurm, missing


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = missing()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but no local Slurm can run: {reason}")
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()
