"""The demo's pictures and the questions about them: 1 to 3 shapes on a plain or tinted canvas, and
questions whose answers only the picture holds.

A scene is data: {"background": [r, g, b], "shapes": [{"shape", "color", "x0", "y0", "d"}, ...]},
a shape filling the d x d box at (x0, y0) (pixels of the canvas). Within a scene shapes differ in
kind and in colour and do not touch, so "the circle" and "the red shape" name one shape each. Two
renderers draw a scene: `draw_scene` (PIL, whole pixels, the training and held-out data) and
`draw_scene_independent` (numpy, 4x supersampled, sub-pixel boxes, colours of other shades,
a noisy background: the independent set). Scenes for the independent set are drawn with
sub-pixel sizes and corners too.

Question types, each asked in several wordings; yes/no answers are balanced:
    color     What color is the <shape>? (or "the shape" when it is alone)
    shape     What shape is the <colour> object? (or "What shape is this?" when alone)
    position  Is the <shape> on the left or the right? (asked of shapes wholly inside one half)
    count     How many shapes are there?
    exists    Is there a <shape>? / Is there a <colour> shape? / Do you see a <colour> <shape>?
    negation  Is there no <shape>? / Is there no <colour> shape? / Is the <shape> not <colour>?
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

Rng = np.random.Generator
# Dark and grey ones included; the independent renderer uses other shades of the same names.
COLORS = {
    "red": (220, 20, 20), "orange": (245, 130, 0), "yellow": (235, 200, 0), "green": (20, 150, 40),
    "blue": (30, 60, 220), "purple": (130, 40, 180), "black": (20, 20, 20), "gray": (128, 128, 128),
}  # fmt: skip
IND_COLORS = {
    "red": (200, 35, 45), "orange": (235, 145, 30), "yellow": (245, 215, 40), "green": (50, 170, 70),
    "blue": (50, 90, 200), "purple": (145, 60, 165), "black": (40, 35, 45), "gray": (140, 140, 135),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
NUMBERS = ("one", "two", "three")
# Shape sizes in pixels of a 64 px canvas; with more shapes the largest allowed shrinks so that they fit.
SIZE_RANGE = (8, 48)
MAX_SIZE_BY_COUNT = {1: 48, 2: 30, 3: 24}
GAP = 2  # pixels kept between shapes

WORDINGS = {
    "color": {"alone": ("What color is the shape?", "Which colour is the shape?", "Tell me the color of the shape."),
              "named": ("What color is the {shape}?", "Which colour is the {shape}?", "Tell me the color of the {shape}.")},
    "shape": {"alone": ("What shape is this?", "Which shape do you see?", "What kind of shape is it?"),
              "named": ("What shape is the {color} object?", "Which shape is {color}?", "What kind of shape is the {color} one?")},
    "position": {"alone": ("Is the shape on the left or the right?", "Which side is the shape on?",
                           "Where is the shape, left or right?"),
                 "named": ("Is the {shape} on the left or the right?", "Which side is the {shape} on?",
                           "Where is the {color} shape, left or right?")},
    "count": {"any": ("How many shapes are there?", "How many shapes do you see?", "Count the shapes.")},
}  # fmt: skip
ANSWERS = {"color": tuple(COLORS), "shape": SHAPES, "position": SIDES, "count": NUMBERS,
           "exists": ("yes", "no"), "negation": ("yes", "no")}  # fmt: skip
TYPES = tuple(ANSWERS)


@dataclass(frozen=True)
class Family:
    """Which pictures and questions a data set draws."""

    colors: tuple[str, ...]
    counts: tuple[int, ...]  # shapes per picture
    sizes: tuple[int, int]  # shape sizes, pixels of a 64 px canvas
    tinted: float  # share of pictures on a light tint rather than white
    types: tuple[str, ...]
    sided: bool = False  # every shape wholly inside the left or the right half
    named: bool = True  # questions name their shape ("the circle"), not only "the shape"
    wordings: int = 3  # how many of each question's wordings are used
    question_first: float = 0.2  # share of rows asking before the picture or sound ("What color is it?\n<image>")

    def wording(self, qtype: str, kind: str) -> tuple[str, ...]:
        return WORDINGS[qtype][kind][: self.wordings]

    def answers(self, qtype: str) -> tuple[str, ...]:
        if qtype == "color":
            return self.colors
        if qtype == "count":
            return tuple(NUMBERS[n - 1] for n in self.counts)
        return ANSWERS[qtype]


# "wide": the family described above. "simple": one shape of 20-30 px inside one half of a white
# canvas, in 4 colours, asked its colour, shape and side in three wordings each: the earlier demo's
# task. Measured on the tiny demo model (README): with a tower trained through the answers alone,
# "wide" stays near chance for every question type (colour 44.7% at best). Most of its questions
# come before the picture: given perfect eyes, 5 stage-2 epochs then learned shape to 81.6% and
# negation to 64.9% (each patch's column given too), against 55.3% and 45.9% with a fifth first.
FAMILIES = {
    "wide": Family(tuple(COLORS), (1, 2, 3), SIZE_RANGE, 0.6, TYPES, question_first=0.8),
    "simple": Family(("red", "green", "blue", "yellow"), (1,), (20, 30), 0.0, ("color", "shape", "position"),
                     sided=True, named=False),
}


def side_of(shape: dict, size: int) -> str | None:
    """"left" / "right" when the shape lies wholly in that half of the canvas, else None."""
    if shape["x0"] + shape["d"] <= size / 2:
        return "left"
    if shape["x0"] >= size / 2:
        return "right"
    return None


def sample_scene(rng: Rng, size: int = 64, n: int | None = None, continuous: bool = False,
                 family: Family = FAMILIES["wide"]) -> dict:  # fmt: skip
    """Shapes of distinct kinds and colours, not touching, on white or a light tint."""
    n = int(rng.choice(family.counts)) if n is None else n
    kinds = [str(k) for k in rng.permutation(SHAPES)[:n]]
    colors = [str(c) for c in rng.permutation(list(family.colors))[:n]]
    tint = rng.integers(205, 256, 3) if rng.random() < family.tinted else np.array([255, 255, 255])
    scale = size / 64
    while True:
        shapes = []
        for kind, color in zip(kinds, colors):
            for _ in range(50):
                low, high = family.sizes[0] * scale, min(family.sizes[1], MAX_SIZE_BY_COUNT[n]) * scale
                d = rng.uniform(low, high) if continuous else int(rng.integers(round(low), round(high) + 1))
                x0, y0 = (rng.uniform(1, size - 1 - d) if continuous else int(rng.integers(1, size - d)) for _ in range(2))
                if family.sided:  # inside one half, 1 px from its edges
                    half = size / 2 if continuous else size // 2
                    left = rng.random() < 0.5
                    x0 = (0 if left else half) + (rng.uniform(1, half - 1 - d) if continuous else int(rng.integers(1, half - d)))
                box = {"shape": kind, "color": color, "x0": x0, "y0": y0, "d": d}
                if all(_apart(box, other) for other in shapes):
                    shapes.append(box)
                    break
        if len(shapes) == n:
            return {"background": [int(v) for v in tint], "shapes": [_plain(s) for s in shapes]}


def _apart(a: dict, b: dict) -> bool:
    return (a["x0"] + a["d"] + GAP <= b["x0"] or b["x0"] + b["d"] + GAP <= a["x0"]
            or a["y0"] + a["d"] + GAP <= b["y0"] or b["y0"] + b["d"] + GAP <= a["y0"])  # fmt: skip


def _plain(shape: dict) -> dict:
    return {k: (round(float(v), 3) if isinstance(v, (float, np.floating)) else int(v) if isinstance(v, np.integer) else v)
            for k, v in shape.items()}  # fmt: skip


def draw_scene(scene: dict, size: int = 64) -> Image.Image:
    """PIL, whole pixels: the training and held-out pictures."""
    img = Image.new("RGB", (size, size), tuple(scene["background"]))
    draw = ImageDraw.Draw(img)
    for s in scene["shapes"]:
        _draw_shape(draw, s, COLORS[s["color"]])
    return img


def shape_mask(shape: dict, size: int = 64) -> Image.Image:
    """The pixels `draw_scene` paints for `shape`: 1 on 0, mode "L"."""
    mask = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, 1)
    return mask


def _draw_shape(draw: ImageDraw.ImageDraw, s: dict, fill) -> None:
    x0, y0, d = s["x0"], s["y0"], s["d"]
    x1, y1 = x0 + d - 1, y0 + d - 1
    if s["shape"] == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif s["shape"] == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    else:
        draw.polygon([(x0 + (d - 1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def draw_scene_independent(scene: dict, rng: Rng, size: int = 64) -> Image.Image:
    """Numpy, 4x supersampled anti-aliasing, jittered colours of other shades, a noisy background."""
    ss = 4
    ys, xs = (np.mgrid[0 : size * ss, 0 : size * ss] + 0.5) / ss
    image = np.array(scene["background"], float) + rng.normal(0, 2.0, (size, size, 3))
    for s in scene["shapes"]:
        u, v = (xs - s["x0"]) / s["d"], (ys - s["y0"]) / s["d"]  # shape-local coordinates in [0, 1]
        if s["shape"] == "circle":
            mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
        elif s["shape"] == "square":
            mask = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
        else:
            mask = (v <= 1) & (v >= 2 * np.abs(u - 0.5))
        alpha = mask.reshape(size, ss, size, ss).mean(axis=(1, 3))[..., None]
        fg = np.clip(np.array(IND_COLORS[s["color"]]) + rng.integers(-8, 9, 3), 0, 255)
        image = image * (1 - alpha) + fg * alpha
    return Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8))


def ask(rng: Rng, scene: dict, qtype: str, answer: str, size: int = 64, family: Family = FAMILIES["wide"]) -> str | None:
    """A question of `qtype` about `scene` whose answer is `answer`, in a random wording; None when
    the scene has no such question (the caller draws another scene)."""
    shapes = scene["shapes"]
    alone = len(shapes) == 1
    pick = lambda options: options[int(rng.integers(len(options)))]
    if qtype in ("color", "shape", "position"):
        key = {"color": "color", "shape": "shape", "position": None}[qtype]
        targets = [s for s in shapes if (side_of(s, size) if key is None else s[key]) == answer]
        if not targets:
            return None
        target = targets[0]
        use_alone = alone and (not family.named or rng.random() < 0.5)
        wording = pick(family.wording(qtype, "alone" if use_alone else "named"))
        return wording.format(shape=target["shape"], color=target["color"])
    if qtype == "count":
        return pick(family.wording("count", "any")) if NUMBERS[len(shapes) - 1] == answer else None
    kinds, colors = {s["shape"] for s in shapes}, {s["color"] for s in shapes}
    form = int(rng.integers(3))
    if qtype == "exists":
        if form == 0:  # Is there a <shape>?
            options = sorted(kinds) if answer == "yes" else sorted(set(SHAPES) - kinds)
            return f"Is there a {pick(options)}?" if options else None
        if form == 1:  # Is there a <colour> shape?
            options = sorted(colors) if answer == "yes" else sorted(set(family.colors) - colors)
            return f"Is there a {pick(options)} shape?"
        pairs = {(s["color"], s["shape"]) for s in shapes}  # Do you see a <colour> <shape>?
        options = sorted(pairs) if answer == "yes" else [(c, k) for c in sorted(colors) for k in SHAPES if (c, k) not in pairs]
        return "Do you see a {} {}?".format(*pick(options)) if options else None
    if form == 0:  # Is there no <shape>?
        options = sorted(set(SHAPES) - kinds) if answer == "yes" else sorted(kinds)
        return f"Is there no {pick(options)}?" if options else None
    if form == 1:  # Is there no <colour> shape?
        options = sorted(set(family.colors) - colors) if answer == "yes" else sorted(colors)
        return f"Is there no {pick(options)} shape?"
    target = shapes[int(rng.integers(len(shapes)))]  # Is the <shape> not <colour>?
    other = pick(sorted(set(family.colors) - {target["color"]}))
    return f"Is the {target['shape']} not {other if answer == 'yes' else target['color']}?"


def scene_and_question(rng: Rng, qtype: str, answer: str, size: int = 64, continuous: bool = False,
                       n: int | None = None, family: Family = FAMILIES["wide"]) -> tuple[dict, str]:  # fmt: skip
    """A scene and a question about it with the given answer (scenes are drawn until one fits)."""
    while True:
        scene = sample_scene(rng, size, n, continuous, family)
        question = ask(rng, scene, qtype, answer, size, family)
        if question is not None:
            return scene, question


def true_answer(scene: dict, question: str, size: int = 64) -> str:
    """The answer to one of `ask`'s questions, worked out from the scene alone (tests check each
    row's answer with it; it shares no code with `ask`)."""
    import re

    shapes, q = scene["shapes"], question.rstrip("?.")
    named = lambda word: [s for s in shapes if word in (s["shape"], s["color"])]
    if m := re.fullmatch(r"Is the (\w+) not (\w+)", q):
        return "yes" if named(m[1])[0]["color"] != m[2] else "no"
    if m := re.fullmatch(r"Is there no (\w+)(?: shape)?", q):
        return "no" if named(m[1]) else "yes"
    if m := re.fullmatch(r"Do you see a (\w+) (\w+)", q):
        return "yes" if any(s["color"] == m[1] and s["shape"] == m[2] for s in shapes) else "no"
    if m := re.fullmatch(r"Is there a (\w+)(?: shape)?", q):
        return "yes" if named(m[1]) else "no"
    if "How many" in q or "Count" in q:
        return NUMBERS[len(shapes) - 1]
    words = [w for w in re.findall(r"\w+", q) if w in COLORS or w in SHAPES]
    target = named(words[0])[0] if words else shapes[0]
    if "left or" in q or "side" in q:
        return side_of(target, size) or "neither"
    if "colo" in q:
        return target["color"]
    return target["shape"]
