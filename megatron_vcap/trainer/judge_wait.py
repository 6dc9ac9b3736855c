"""``judge.base_url_file``: wait for a judge server started by another job, then use its URL.

``examples/slurm/judge_server.sbatch`` (or the judge part of ``train_with_judge.sbatch``) writes
the OpenAI-compatible base URL of its vLLM server into a file once the server listens. A trainer
whose config names that file polls for it, then polls the server until it answers an HTTP
request (vLLM opens its port only after the model is loaded; a 503 means still loading), and
takes the URL from the file. Gives up after ``judge.wait_s`` with a message naming the file.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

from megatron_vcap.config.loader import ConfigError

log = logging.getLogger(__name__)


def read_url_file(path: Path) -> str | None:
    """The URL in ``path`` (first non-empty line), or None while the file is absent or empty."""
    try:
        lines = [x.strip() for x in path.read_text().splitlines() if x.strip()]
    except FileNotFoundError:
        return None
    return lines[0] if lines else None


def server_answers(base_url: str, timeout: float = 5.0) -> bool:
    """True once an HTTP server answers at ``base_url`` (GET /models), other than 503."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=timeout):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code != 503
    except (urllib.error.URLError, OSError):
        return False


def wait_for_judge(judge_cfg, *, poll_s: float = 2.0, clock=time.monotonic) -> str | None:
    """Resolve ``judge.base_url_file`` into ``judge_cfg.base_url`` (in place); returns the URL.

    No-op (None) unless the judge is an OpenAI endpoint and the file is configured.
    """
    if judge_cfg.kind != "openai" or not judge_cfg.base_url_file:
        return None
    path = Path(judge_cfg.base_url_file)
    deadline = clock() + judge_cfg.wait_s
    url, announced = None, False
    while True:
        url = read_url_file(path)
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigError(f"judge.base_url_file: {path}: expected an http(s) URL, got {url!r}")
        if url is not None and server_answers(url):
            break
        if clock() >= deadline:
            state = f"{url} does not answer" if url else "the file does not exist or is empty"
            raise ConfigError(
                f"judge.base_url_file: {path}: no judge after {judge_cfg.wait_s:.0f} s "
                f"(judge.wait_s); {state}"
            )
        if not announced:
            log.warning("waiting for the judge: %s (%s)", path, url or "no URL yet")
            announced = True
        time.sleep(poll_s)
    log.info("judge at %s (from %s)", url, path)
    judge_cfg.base_url = url
    return url
