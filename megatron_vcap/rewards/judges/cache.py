"""On-disk cache of validated judge answers, keyed by model and prompt.

One small JSON file per answer (``<dir>/<key[:2]>/<key>.json``), written to a temporary name and
renamed into place, so that several processes (data-parallel ranks, a resumed run) can share one
directory without locks and a crash never leaves a half-written entry. Only answers that passed
validation are stored; a corrupt entry reads as a miss. The key hashes the model name, the
messages, the requested schema and the sampling settings, never any credential.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def cache_key(model: str, messages: Any, schema: Any, **sampling: Any) -> str:
    """Stable sha256 of everything that determines a judge answer."""
    blob = json.dumps(
        {"model": model, "messages": messages, "schema": schema, "sampling": sampling},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class AnswerCache:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        """The stored answer text, or None on a miss (or an unreadable entry)."""
        path = self._path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return data["answer"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("judge cache: ignoring unreadable entry %s (%s)", path, exc)
            return None

    def put(self, key: str, answer: str, model: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"model": model, "answer": answer}, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
