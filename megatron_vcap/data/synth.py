"""Synthetic captioning data: procedurally generated MP4 scenes with exact ground truth.

A scene is a plain background with 1-3 subjects (shapes with a colour, size and texture), each
doing one or two actions in sequence (move in a direction, grow, shrink, spin, bounce, change
colour, appear, disappear). Because the generator knows what happens, the reference caption,
the structure (subjects with attributes and actions) and the event list are exact. Videos are
real H.264 MP4 files written with PyAV; the dataset folder also gets a tiny Qwen-style tokenizer
(``tiny_tokenizer.py``) so the demo runs the same code path as real checkpoints.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_vcap.data.manifest import Sample, write_manifest
from megatron_vcap.data.tiny_tokenizer import build_tiny_tokenizer
from megatron_vcap.data.video_io import write_mp4
from megatron_vcap.progress import progress
from megatron_vcap.structure import Subject, render_response

COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 205, 30),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
BACKGROUNDS = {
    "light gray": (200, 200, 200),
    "dark gray": (70, 70, 70),
    "pale blue": (185, 210, 240),
    "beige": (230, 218, 185),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.10, "medium": 0.14, "large": 0.19}  # radius / min(width, height)
TEXTURES = {"solid": "plain", "striped": "striped", "dotted": "dotted", "checkered": "checkered"}
MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
ACTION_KINDS = ("move", "grow", "shrink", "spin", "bounce", "change_color", "appear", "disappear")
MOVE_FRACTION = 0.3  # of the frame width/height covered by one move


@dataclass
class Action:
    kind: str
    start: float  # seconds
    end: float
    direction: str | None = None  # move
    new_color: str | None = None  # change_color

    def phrase(self) -> str:
        if self.kind == "move":
            sideways = self.direction in ("left", "right")
            return f"moves to the {self.direction}" if sideways else f"moves {self.direction}"
        return {
            "grow": "grows larger",
            "shrink": "shrinks",
            "spin": "spins around",
            "bounce": "bounces up and down",
            "change_color": f"turns {self.new_color}",
            "appear": "appears",
            "disappear": "disappears",
        }[self.kind]


@dataclass
class SceneSubject:
    shape: str
    color: str
    size: str
    texture: str
    x: float  # start centre, pixels
    y: float
    actions: list[Action] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.size} {self.color} {self.shape}"

    def attributes(self) -> list[str]:
        return [self.color, self.size, TEXTURES[self.texture]]


@dataclass
class Scene:
    width: int
    height: int
    seconds: float
    background: str
    subjects: list[SceneSubject]


def _progress(action: Action, t: float) -> float:
    """0 before the action, 1 after, smooth in between."""
    if t <= action.start:
        return 0.0
    if t >= action.end:
        return 1.0
    p = (t - action.start) / (action.end - action.start)
    return p * p * (3 - 2 * p)


def subject_state(subject: SceneSubject, t: float, scene: Scene) -> dict:
    """Centre, radius, rotation, colour and visibility of a subject at time ``t``."""
    base_r = SIZES[subject.size] * min(scene.width, scene.height)
    x, y, r, angle, color = subject.x, subject.y, base_r, 0.0, subject.color
    visible = not any(a.kind == "appear" for a in subject.actions)
    for a in subject.actions:
        p = _progress(a, t)
        if a.kind == "move":
            dx, dy = MOVES[a.direction]
            x += dx * MOVE_FRACTION * scene.width * p
            y += dy * MOVE_FRACTION * scene.height * p
        elif a.kind == "grow":
            r *= 1 + 0.6 * p
        elif a.kind == "shrink":
            r *= 1 - 0.5 * p
        elif a.kind == "spin":
            angle += 2 * math.pi * p
        elif a.kind == "bounce":
            frac = 0.0 if p in (0.0, 1.0) else abs(math.sin(2 * math.pi * p))
            y -= 0.6 * base_r * frac
        elif a.kind == "change_color" and p >= 0.5:
            color = a.new_color
        elif a.kind == "appear" and p >= 0.5:
            visible = True
        elif a.kind == "disappear" and p >= 0.5:
            visible = False
    return {"x": x, "y": y, "r": r, "angle": angle, "color": color, "visible": visible}


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= r
    # Triangle pointing up in the subject's own frame.
    return (v <= 0.6 * r) & (v >= -r + 1.6 * np.abs(u))


def _texture_mask(texture: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray | None:
    k = max(r / 3.0, 2.0)
    if texture == "striped":
        return (np.floor(u / k) % 2) == 0
    if texture == "checkered":
        return (np.floor(u / k) + np.floor(v / k)) % 2 == 0
    if texture == "dotted":
        du, dv = (u % k) - k / 2, (v % k) - k / 2
        return du * du + dv * dv <= (k / 3.5) ** 2
    return None


def render_frame(scene: Scene, t: float) -> np.ndarray:
    """uint8 [height, width, 3] RGB frame of the scene at time ``t`` seconds."""
    frame = np.empty((scene.height, scene.width, 3), np.uint8)
    frame[:] = BACKGROUNDS[scene.background]
    for subject in scene.subjects:
        s = subject_state(subject, t, scene)
        if not s["visible"] or s["r"] < 1:
            continue
        reach = int(math.ceil(s["r"] * 1.5)) + 1
        x0, x1 = max(0, int(s["x"]) - reach), min(scene.width, int(s["x"]) + reach + 1)
        y0, y1 = max(0, int(s["y"]) - reach), min(scene.height, int(s["y"]) + reach + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        cos, sin = math.cos(s["angle"]), math.sin(s["angle"])
        dx, dy = xx - s["x"], yy - s["y"]
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # rotate into the subject's frame
        mask = _shape_mask(subject.shape, u, v, s["r"])
        color = np.array(COLORS[s["color"]], np.float32)
        patch = frame[y0:y1, x0:x1]
        tex = _texture_mask(subject.texture, u, v, s["r"])
        fill = np.broadcast_to(color, patch.shape).copy()
        if tex is not None:  # the pattern is a darker shade of the same colour
            fill[tex] = color * 0.45
        patch[mask] = fill[mask].astype(np.uint8)
    return frame


def _pick_actions(
    rng: np.random.Generator, seconds: float, color: str, palette: list[str]
) -> list[Action]:
    count = int(rng.integers(1, 3))
    bounds = [(0.0, seconds)] if count == 1 else [(0.0, seconds / 2), (seconds / 2, seconds)]
    actions = []
    for i, (t0, t1) in enumerate(bounds):
        options = [k for k in ACTION_KINDS if not (k == "appear" and i > 0)]
        options = [k for k in options if not (k == "disappear" and i < count - 1)]
        used = {a.kind for a in actions}
        options = [k for k in options if k == "move" or k not in used]
        kind = str(rng.choice(options))
        a = Action(kind, t0, t1)
        if kind == "move":
            a.direction = str(rng.choice(list(MOVES)))
        if kind == "change_color":
            a.new_color = str(rng.choice([c for c in palette if c != color]))
        actions.append(a)
    return actions


def _place(rng, subject: SceneSubject, width: int, height: int) -> None:
    """Start position such that the whole path (moves, growth, bounce) stays in frame."""
    r = SIZES[subject.size] * min(width, height) * 1.6
    dxs, dys = [0.0], [0.0]
    for a in subject.actions:
        if a.kind == "move":
            dx, dy = MOVES[a.direction]
            dxs.append(dxs[-1] + dx * MOVE_FRACTION * width)
            dys.append(dys[-1] + dy * MOVE_FRACTION * height)
    lo_x, hi_x = r - min(dxs), width - r - max(dxs)
    lo_y, hi_y = r - min(dys), height - r - max(dys)
    subject.x = float(rng.uniform(lo_x, hi_x)) if hi_x > lo_x else width / 2
    subject.y = float(rng.uniform(lo_y, hi_y)) if hi_y > lo_y else height / 2


def random_scene(rng: np.random.Generator, width: int, height: int, seconds: float) -> Scene:
    background = str(rng.choice(list(BACKGROUNDS)))
    bg = np.array(BACKGROUNDS[background], np.float32)
    # Keep every colour clearly visible against the background.
    palette = [c for c in COLORS if np.abs(np.array(COLORS[c]) - bg).sum() > 180]
    subjects, used = [], set()
    for _ in range(int(rng.integers(1, 4))):
        shape, color = str(rng.choice(SHAPES)), str(rng.choice(palette))
        if (shape, color) in used:  # descriptions must tell subjects apart
            continue
        used.add((shape, color))
        subject = SceneSubject(
            shape, color, str(rng.choice(list(SIZES))), str(rng.choice(list(TEXTURES))), 0, 0
        )
        subject.actions = _pick_actions(rng, seconds, color, palette)
        if subject.shape == "circle" and subject.texture == "solid":
            # A plain circle looks the same at every angle: a spin would be invisible.
            for a in subject.actions:
                if a.kind == "spin":
                    a.kind = "grow" if all(b.kind != "grow" for b in subject.actions) else "bounce"
        _place(rng, subject, width, height)
        subjects.append(subject)
    return Scene(width, height, seconds, background, subjects)


def describe_scene(scene: Scene) -> tuple[str, list[Subject], list[str]]:
    """Exact (caption, structure, events) for a scene."""
    count = len(scene.subjects)
    noun = "shape" if count == 1 else "shapes"
    sentences = [
        f"The video shows {_number_word(count)} {noun} on a {scene.background} background."
    ]
    structure = []
    for s in scene.subjects:
        phrases = [a.phrase() for a in s.actions]
        article = "An" if s.size[0] in "aeiou" else "A"
        texture = "" if s.texture == "solid" else f" {TEXTURES[s.texture]}"
        sentences.append(
            f"{article} {s.size} {s.color}{texture} {s.shape} {' and then '.join(phrases)}."
        )
        structure.append(Subject(f"a {s.name}", s.attributes(), phrases))
    timed = [(a.start, i, s, a) for i, s in enumerate(scene.subjects) for a in s.actions]
    events = [f"The {s.name} {a.phrase()}." for _, _, s, a in sorted(timed, key=lambda e: e[:2])]
    return " ".join(sentences), structure, events


def _number_word(n: int) -> str:
    return ["no", "one", "two", "three", "four", "five"][n] if n <= 5 else str(n)


@dataclass
class SynthPaths:
    root: Path
    videos_dir: Path
    manifest: Path
    train_manifest: Path | None
    eval_manifest: Path | None
    tokenizer_dir: Path | None


# The tokenizer's corpus depends only on this seed: every synthetic dataset gets the same one.
TOKENIZER_CORPUS_SEED = 20250602
TOKENIZER_CORPUS_SCENES = 1500


def tokenizer_corpus(
    num_scenes: int = TOKENIZER_CORPUS_SCENES, seed: int = TOKENIZER_CORPUS_SEED
) -> list[str]:
    """Texts of random scenes (structured responses and events) for the tiny tokenizer."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(num_scenes):
        scene = random_scene(rng, 160, 120, 4.0)
        caption, subjects, events = describe_scene(scene)
        texts.append(render_response(subjects, caption))
        texts.extend(events)
    return texts


@dataclass(frozen=True)
class _VideoJob:
    """Render, encode and describe video ``i`` of a dataset (picklable, for a process pool)."""

    videos_dir: Path
    seed: int
    width: int
    height: int
    fps: float
    seconds: float

    def __call__(self, i: int) -> Sample:
        rng = np.random.default_rng([self.seed, i])
        scene = random_scene(rng, self.width, self.height, self.seconds)
        num_frames = max(2, int(round(self.fps * self.seconds)))
        frames = (render_frame(scene, k / self.fps) for k in range(num_frames))
        path = write_mp4(
            self.videos_dir / f"synth_{i:05d}.mp4",
            frames,
            fps=self.fps,
            width=self.width,
            height=self.height,
        )
        caption, structure, events = describe_scene(scene)
        return Sample(
            f"synth_{i:05d}", str(path.resolve()), caption, subjects=structure, events=events
        )


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_videos: int,
    seed: int = 0,
    *,
    width: int = 160,
    height: int = 120,
    fps: float = 8.0,
    seconds: float = 4.0,
    eval_fraction: float = 0.0,
    write_tokenizer: bool = True,
    show_progress: bool = False,
    workers: int = 1,
) -> SynthPaths:
    """Write ``num_videos`` MP4s, ``manifest.jsonl`` (+ train/eval split) and ``tokenizer/``
    (``show_progress``: a bar on a terminal's stderr). ``workers`` > 1 renders and encodes the
    videos in that many processes; each video depends only on ``(seed, index)``, so the files
    and the manifest are the same for any ``workers``."""
    if num_videos < 1:
        raise ValueError(f"num_videos: must be >= 1, got {num_videos}")
    if width < 16 or height < 16 or fps <= 0 or seconds <= 0:
        raise ValueError("width/height must be >= 16 and fps, seconds > 0")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction: must be in [0, 1), got {eval_fraction}")
    root = Path(out_dir)
    videos_dir = root / "videos"
    job = _VideoJob(videos_dir, seed, width, height, fps, seconds)
    indices = range(num_videos)
    bar = dict(desc="videos", unit="video", enabled=show_progress, total=num_videos)
    workers = max(1, min(workers, num_videos // 16))  # a pool pays off from a few dozen videos
    if workers == 1:
        samples = [job(i) for i in progress(indices, **bar)]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: the caller may hold threads (torch, a judge) that a fork would copy mid-state.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            samples = list(progress(pool.map(job, indices, chunksize=8), **bar))
    manifest = write_manifest(root / "manifest.jsonl", samples)
    train = evaluation = None
    if eval_fraction > 0:
        n_eval = min(num_videos - 1, max(1, int(round(eval_fraction * num_videos))))
        train = write_manifest(root / "train.jsonl", samples[: num_videos - n_eval])
        evaluation = write_manifest(root / "eval.jsonl", samples[num_videos - n_eval :])
    tokenizer_dir = None
    if write_tokenizer:
        tokenizer_dir = build_tiny_tokenizer(root / "tokenizer", tokenizer_corpus())
    return SynthPaths(root, videos_dir, manifest, train, evaluation, tokenizer_dir)
