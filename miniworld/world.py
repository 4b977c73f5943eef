"""miniworld/world.py -- a synthetic image-editing world with exact ground truth.

The project's CartPole. Scenes are 2-3 flat-coloured shapes on a plain background, one per
cell of a 3x3 grid. Everything the stage scripts see is what real data gives them: PIL
images, instruction strings and principle lists [{"question", "category"}]. Ground truth
is computed from *pixels + text* (perceive() both images, parse the instruction and the
question strings), so it applies to any image of the right kind, including one an editing
model drew, not only to this file's own renders.

Why these numbers: 96 px with 32-px cells. The RRM's Qwen2.5-VL processor resizes 96 -> 84
px, where one merged vision token (patch 14 x merge 2 = 28 px) covers exactly one cell
(notes/MINIWORLD-DERISK.md: a token per cell is what a tiny model can learn).

Read top to bottom:
  1. palette, config, difficulty presets
  2. scenes: Obj / Scene, positions, describe(), render(), add_noise()
  3. perception: perceive(), noise_level()
  4. edits: instruction templates, parse_instruction(), apply_edit(), sample an edit
  5. principles: question templates, principles_for(), parse_question()
  6. ground truth: check_principles() on scenes, ground_truth() / utility() on images
  7. splits and contexts: split_of(), sample_context(), sample_contexts()

utility(): the world's true quality of an edit on 0..10 (it defines human preferences):
    utility = 0                                         if the edit changed nothing
            = clip(10 - 4*F - 5*K - 2*Q, 0, 10)         otherwise
with F / K / Q the numbers of failed Follow / Keep / Quality principles. A change nobody
asked for (K, 5 points) costs more than a requested change that was missed (F, 4 points):
the paper's rule. Removing an object that should stay fails two Keep questions (the object
and "no other objects added or removed"), so it costs 10.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache, wraps

import numpy as np
from PIL import Image, ImageFilter

# =========================================================================================
# 1. Palette and configuration
# =========================================================================================
SHAPES = ("circle", "square", "triangle")
# Object colours: saturated and far apart in RGB (every pair > 130, every colour > 115 from
# every background), so the nearest-colour rule survives noise and JPEG.
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 230),
          "yellow": (240, 220, 30), "purple": (140, 40, 190)}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (240, 240, 240), "black": (20, 20, 20)}
# Edit categories, named as GEdit-Bench's task types so evaluate.py can group by them.
EDIT_CATEGORIES = ("color_alter", "subject-add", "subject-remove", "subject-replace",
                   "background_change", "motion_change")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class WorldConfig:
    """Everything that shapes the world. Frozen: one config = one world."""
    size: int = 96                       # image side in px (world renders and perceives at it)
    grid: int = 3                        # grid x grid cells, one object at most per cell
    min_objects: int = 2                 # objects per source scene
    max_objects: int = 3
    source_backgrounds: tuple = ("grey",)  # backgrounds a source scene may have
    categories: tuple = EDIT_CATEGORIES  # edit categories that sample_context draws from
    noise_sigma: float = 40.0            # std of the Gaussian pixel noise editors may add
    noise_threshold: float = 5.0         # noise_level() above this = "not free of noise"
    #   (measured: clean renders < 1, JPEG q75 / resized renders < 2.5, noise std 25 > 9)
    split_fractions: tuple = (0.8, 0.1, 0.1)  # train / val / test share of source scenes

    @property
    def cell(self) -> int:
        assert self.size % self.grid == 0, "size must be a multiple of grid"
        return self.size // self.grid


# Difficulty is a setting: easy = the derisk experiment's learnable world (2 objects,
# recolour + remove, loud noise); hard = more objects, every edit, subtler noise.
DIFFICULTIES = {
    "easy": dict(min_objects=2, max_objects=2, categories=("color_alter", "subject-remove"),
                 noise_sigma=60.0),
    "medium": dict(),
    "hard": dict(min_objects=3, max_objects=4, noise_sigma=25.0),
}


def make_config(difficulty: str = "medium", **overrides) -> WorldConfig:
    """A WorldConfig from a difficulty preset, then any field overridden by keyword."""
    return WorldConfig(**{**DIFFICULTIES[difficulty], **overrides})


DEFAULT = WorldConfig()

# =========================================================================================
# 2. Scenes
# =========================================================================================
@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cell: tuple  # (row, col)
    # perceive(): ((shape, IoU of its template), ...) for every shape; () for scenes built
    # by hand. Not part of equality: two scenes are equal if their best readings are.
    fit: tuple = field(default=(), compare=False, repr=False)

    @property
    def also(self) -> tuple:
        """Other shapes the pixels fit almost as well as self.shape (IoU within SHAPE_TOL),
        e.g. a drawn circle with squarish sides; () on the world's own renders."""
        best = dict(self.fit).get(self.shape, 1.0)
        return tuple(s for s, v in self.fit if s != self.shape and v >= best - SHAPE_TOL)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple = ()  # Obj's sorted by cell: equal scenes compare equal


def make_scene(background: str, objects) -> Scene:
    return Scene(background, tuple(sorted(objects, key=lambda o: o.cell)))


def object_at(scene: Scene, cell) -> Obj | None:
    return next((o for o in scene.objects if o.cell == tuple(cell)), None)


@lru_cache(maxsize=None)
def cell_names(grid: int) -> dict:
    """{(r, c): name}. 3x3: top left, top, top right, left, center, ... bottom right."""
    if grid not in (2, 3):
        return {(r, c): f"row {r + 1} column {c + 1}" for r in range(grid) for c in range(grid)}
    rows, cols = (("top", "bottom"), ("left", "right")) if grid == 2 else \
        (("top", "", "bottom"), ("left", "", "right"))
    return {(r, c): f"{rows[r]} {cols[c]}".strip() or "center"
            for r in range(grid) for c in range(grid)}


def cell_from_name(name: str, grid: int):
    return {v: k for k, v in cell_names(grid).items()}.get(name.strip().lower())


def describe(scene: Scene, config: WorldConfig = DEFAULT) -> str:
    """'grey background; red circle at top left; blue square at center'"""
    names = cell_names(config.grid)
    return "; ".join([f"{scene.background} background"] +
                     [f"{o.color} {o.shape} at {names[o.cell]}" for o in scene.objects])


def describe_change(a: Scene, b: Scene, config: WorldConfig = DEFAULT) -> str:
    """Cell-by-cell difference between two scenes, 'nothing' if none (the RRM base's
    pretraining wording, miniworld/pretrain_rrm.py task 1):
    'background grey -> blue; top left red circle -> green circle; center empty -> blue square'"""
    names = cell_names(config.grid)
    changes = [f"background {a.background} -> {b.background}"] if a.background != b.background else []
    for cell in sorted(names):
        oa, ob = object_at(a, cell), object_at(b, cell)
        if oa != ob:
            changes.append(f"{names[cell]} {f'{oa.color} {oa.shape}' if oa else 'empty'} -> "
                           f"{f'{ob.color} {ob.shape}' if ob else 'empty'}")
    return "; ".join(changes) or "nothing"


@lru_cache(maxsize=None)
def shape_masks(cell: int) -> dict:
    """Boolean (cell, cell) masks of each shape, centred in its cell with a 1/8 margin.
    At 32 px: circle r=12 (44% of the cell), square 24x24 (56%), triangle base 24,
    height 24 (28%). The masks are also perceive()'s templates."""
    m = max(2, cell // 8)
    y, x = np.mgrid[0:cell, 0:cell] + 0.5            # pixel centres
    half = cell / 2
    t = (y - m) / (cell - 2 * m)                     # 0 at the apex row, 1 at the base
    return {"circle": (x - half) ** 2 + (y - half) ** 2 <= (half - m) ** 2,
            "square": (x >= m) & (x <= cell - m) & (y >= m) & (y <= cell - m),
            "triangle": (t >= 0) & (t <= 1) & (np.abs(x - half) <= t * (half - m))}


def render(scene: Scene, config: WorldConfig = DEFAULT) -> Image.Image:
    """Flat colours, no anti-aliasing: a clean render holds only palette colours."""
    k, masks = config.cell, shape_masks(config.cell)
    img = np.empty((config.size, config.size, 3), np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        r, c = o.cell
        img[r * k:(r + 1) * k, c * k:(c + 1) * k][masks[o.shape]] = COLORS[o.color]
    return Image.fromarray(img)


def add_noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """Gaussian pixel noise (the world's only image-quality defect)."""
    a = np.asarray(image.convert("RGB"), np.float32)
    a = a + rng.normal(0.0, sigma, a.shape)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


# =========================================================================================
# 3. Perception: pixels -> Scene. Works on any RGB image of the world's kind.
# =========================================================================================
FG_DIST = 60.0     # a (denoised) pixel this far (RGB L2) from the background is foreground
MIN_FILL = 0.12    # a cell holds an object if this share of its pixels is foreground
# A drawn object whose best two shape templates fit within this IoU of each other is
# ambiguous: ground truth accepts either reading (Obj.also). Session 9, 400 edits of the
# base Kontext editor: of 47 kept objects read as another shape, 30 had margins of
# 0.01-0.07 (circles drawn with squarish sides after a background change, which look like
# circles), the other 17 margins of 0.12-0.48 (real reshapes: a square drawn as a
# triangle). The tolerance sits below the world's own closest call: a clean disc fits the
# circle at 0.93 and the square at 0.83 (margin 0.10), so its renders, clean or with the
# editors' noise, are never ambiguous (tests/test_miniworld.py).
SHAPE_TOL = 0.08
_COLOR_NAMES, _COLOR_RGB = list(COLORS), np.array(list(COLORS.values()), np.float32)
_BG_NAMES, _BG_RGB = list(BACKGROUNDS), np.array(list(BACKGROUNDS.values()), np.float32)


def _nearest(rgb, names: list, table: np.ndarray) -> str:
    return names[int(np.argmin(((table - rgb) ** 2).sum(1)))]


def _world_array(image: Image.Image, config: WorldConfig) -> np.ndarray:
    """(size, size, 3) uint8; other sizes are resized (BOX when shrinking: an area average)."""
    image = image.convert("RGB")
    if image.size != (config.size, config.size):
        shrink = image.size[0] > config.size
        image = image.resize((config.size, config.size),
                             Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    return np.asarray(image)


@lru_cache(maxsize=None)
def _half_masks(cell: int) -> dict:
    """Shape templates at half resolution (2x2 average of the full masks, > 1/2)."""
    return {s: m.reshape(cell // 2, 2, cell // 2, 2).mean((1, 3)) > 0.5
            for s, m in shape_masks(cell).items()}


def _memoised(fn):
    """Memo keyed by a digest of the pixels: the VLM pool looks at the same (source, edit)
    pair a dozen times and ground truth reads it once more. Scenes are immutable, so
    sharing a cached one is safe. The memo is emptied when it reaches 20,000 entries."""
    memo = {}

    @wraps(fn)
    def wrapper(image: Image.Image, config: WorldConfig = DEFAULT):
        key = (hashlib.blake2b(image.tobytes(), digest_size=16).digest(), image.size,
               image.mode, config)
        if key not in memo:
            if len(memo) >= 20000:
                memo.clear()
            memo[key] = fn(image, config)
        return memo[key]
    return wrapper


@_memoised
def perceive(image: Image.Image, config: WorldConfig = DEFAULT) -> Scene:
    """Recover the scene from pixels: exact on clean renders, robust to the editors' noise,
    JPEG and resizing (tests/test_miniworld.py checks all three).

    1. halve the resolution by 2x2 averaging and apply a 3x3 median: noise of std s drops
       to about 0.2*s while edges stay, and the work drops 4x;
    2. background = nearest background colour to the median of the border (objects never
       touch it);
    3. per cell: foreground = pixels far from that background colour; an object if enough
       of them; colour = nearest palette colour to their median; shape = the template with
       the highest IoU (shapes within SHAPE_TOL of it go to Obj.also)."""
    a = _world_array(image, config).astype(np.uint16)
    h, k, g = config.size // 2, config.cell // 2, config.grid
    small = ((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4)
    den = np.asarray(Image.fromarray(small.astype(np.uint8)).filter(ImageFilter.MedianFilter(3)),
                     np.float32)                                             # (S/2, S/2, 3)
    border = np.concatenate([den[0], den[-1], den[:, 0], den[:, -1]])        # (4*S/2, 3)
    bg_rgb = np.median(border, axis=0)                                       # (3,)
    fg = ((den - bg_rgb) ** 2).sum(-1) > FG_DIST ** 2                        # (S/2, S/2)
    fill = fg.reshape(g, k, g, k).mean((1, 3))                               # (g, g)
    names, masks = list(_half_masks(config.cell)), np.stack(list(_half_masks(config.cell).values()))
    objects = []
    for r, c in zip(*np.nonzero(fill >= MIN_FILL)):
        f = fg[r * k:(r + 1) * k, c * k:(c + 1) * k]                         # (k, k)
        iou = (f & masks).sum((1, 2)) / (f | masks).sum((1, 2))              # (3,) one per shape
        pix = den[r * k:(r + 1) * k, c * k:(c + 1) * k][f]                   # (n_fg, 3)
        mid = np.partition(pix, len(pix) // 2, axis=0)[len(pix) // 2]        # per-channel median
        objects.append(Obj(names[int(np.argmax(iou))], _nearest(mid, _COLOR_NAMES, _COLOR_RGB), (int(r), int(c)),
                           fit=tuple((n, float(v)) for n, v in zip(names, iou))))
    return make_scene(_nearest(bg_rgb, _BG_NAMES, _BG_RGB), objects)


@_memoised
def noise_level(image: Image.Image, config: WorldConfig = DEFAULT) -> float:
    """Mean |pixel - its 3x3 median| of the grey-level image. A clean render gives < 1
    (only shape corners differ from their median), JPEG or resizing < 2.5, Gaussian RGB noise of std
    s about 0.4*s (grey conversion averages the channels' noise)."""
    grey = Image.fromarray(_world_array(image, config)).convert("L")
    a = np.asarray(grey, np.float32)
    return float(np.abs(a - np.asarray(grey.filter(ImageFilter.MedianFilter(3)), np.float32)).mean())


def is_noisy(image: Image.Image, config: WorldConfig = DEFAULT) -> bool:
    return noise_level(image, config) > config.noise_threshold


# =========================================================================================
# 4. Edits: instruction templates (2-3 paraphrases each), a parser and apply_edit()
# =========================================================================================
# Fields: {obj} a reference to a source object ("the red circle", "the circle at top left",
# "the red circle at top left"), {color}, {shape}, {pos}, {bg}, {dir}.
INSTRUCTIONS = {
    "color_alter": ("make {obj} {color}", "change the color of {obj} to {color}",
                    "paint {obj} {color}"),
    "subject-add": ("add a {color} {shape} at {pos}", "put a {color} {shape} at {pos}"),
    "subject-remove": ("remove {obj}", "delete {obj}", "erase {obj}"),
    "subject-replace": ("replace {obj} with a {color} {shape}", "turn {obj} into a {color} {shape}"),
    "background_change": ("change the background to {bg}", "make the background {bg}"),
    "motion_change": ("move {obj} one cell {dir}", "shift {obj} one cell {dir}"),
}
# One cell is 1/3 of the image: far above the paper's 10% "significant shift" threshold.
DIRECTIONS = {"up": (-1, 0), "down": (1, 0), "to the left": (0, -1), "to the right": (0, 1)}


@lru_cache(maxsize=None)
def _field_patterns(grid: int) -> dict:
    """Regex for each template field: exact alternations, so parsing is unambiguous."""
    def alt(names):
        return "(?:" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + ")"
    color, shape, pos = alt(COLORS), alt(SHAPES), alt(cell_names(grid).values())
    return {"color": color, "shape": shape, "pos": pos, "bg": alt(BACKGROUNDS),
            "dir": alt(DIRECTIONS), "obj": f"the (?:{color} )?{shape}(?: at {pos})?"}


@lru_cache(maxsize=None)
def _template_regex(template: str, grid: int) -> re.Pattern:
    """'make {obj} {color}' -> a compiled regex with one named group per field."""
    pats, parts = _field_patterns(grid), re.split(r"\{(\w+)\}", template)
    rx = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{pats[p]})" for i, p in enumerate(parts))
    return re.compile(rx, re.I)


def match_template(template: str, text: str, grid: int) -> dict | None:
    """Fields of `text` if it is an instance of `template`, else None (case-insensitive)."""
    m = _template_regex(template, grid).fullmatch(" ".join(text.strip().split()))
    return {k: v.lower() for k, v in m.groupdict().items()} if m else None


def refer(obj: Obj, scene: Scene, rng, config: WorldConfig = DEFAULT) -> str:
    """A referring expression that picks out exactly one object of `scene`."""
    pos = cell_names(config.grid)[obj.cell]
    forms = [f"the {obj.shape} at {pos}", f"the {obj.color} {obj.shape} at {pos}"]
    if sum((o.color, o.shape) == (obj.color, obj.shape) for o in scene.objects) == 1:
        forms.append(f"the {obj.color} {obj.shape}")
    return forms[rng.integers(len(forms))]


def resolve(ref: str, scene: Scene, config: WorldConfig = DEFAULT) -> Obj | None:
    """The single object of `scene` that a referring expression names, else None."""
    p = _field_patterns(config.grid)
    m = re.fullmatch(f"the (?:(?P<c>{p['color']}) )?(?P<s>{p['shape']})(?: at (?P<p>{p['pos']}))?", ref)
    if not m:
        return None
    hits = [o for o in scene.objects if o.shape == m["s"] and m["c"] in (None, o.color)
            and (m["p"] is None or o.cell == cell_from_name(m["p"], config.grid))]
    return hits[0] if len(hits) == 1 else None


def parse_instruction(instruction: str, scene: Scene, config: WorldConfig = DEFAULT) -> dict | None:
    """Instruction text + the (perceived) source scene -> an edit spec, or None.

    Spec keys: category, cell (the object edited, or None), to (destination cell of an add
    or a move), color, shape (the new ones), background (the new one)."""
    for category, templates in INSTRUCTIONS.items():
        for t in templates:
            f = match_template(t, instruction, config.grid)
            if f is None:
                continue
            spec = {"category": category, "cell": None, "to": None, "color": f.get("color"),
                    "shape": f.get("shape"), "background": f.get("bg")}
            if "obj" in f:
                obj = resolve(f["obj"], scene, config)
                if obj is None:
                    return None
                spec["cell"] = obj.cell
            if "pos" in f:
                spec["to"] = cell_from_name(f["pos"], config.grid)
            if "dir" in f:
                dr, dc = DIRECTIONS[f["dir"]]
                spec["to"] = (spec["cell"][0] + dr, spec["cell"][1] + dc)
            if spec["to"] is not None and spec["to"] not in free_cells(scene, config.grid):
                return None  # an add or a move needs an empty cell inside the grid
            return spec
    return None


def involved_cells(spec: dict) -> set:
    """Cells the instruction is allowed to change (everything else must stay)."""
    return {c for c in (spec["cell"], spec["to"]) if c is not None}


def apply_edit(scene: Scene, spec: dict) -> Scene:
    """The scene after carrying out `spec` exactly."""
    cat, objs = spec["category"], {o.cell: o for o in scene.objects}
    if cat == "background_change":
        return make_scene(spec["background"], objs.values())
    if cat == "subject-add":
        objs[spec["to"]] = Obj(spec["shape"], spec["color"], spec["to"])
    elif cat == "subject-remove":
        objs.pop(spec["cell"], None)
    elif cat == "color_alter":
        o = objs[spec["cell"]]
        objs[o.cell] = Obj(o.shape, spec["color"], o.cell)
    elif cat == "subject-replace":
        objs[spec["cell"]] = Obj(spec["shape"], spec["color"], spec["cell"])
    elif cat == "motion_change":
        o = objs.pop(spec["cell"])
        objs[spec["to"]] = Obj(o.shape, o.color, spec["to"])
    return make_scene(scene.background, objs.values())


def free_cells(scene: Scene, grid: int) -> list:
    taken = {o.cell for o in scene.objects}
    return [(r, c) for r in range(grid) for c in range(grid) if (r, c) not in taken]


def pick(rng, items):
    """A uniformly drawn element of `items`, None if it is empty."""
    items = list(items)
    return items[rng.integers(len(items))] if items else None


def sample_instruction(rng, scene: Scene, config: WorldConfig = DEFAULT):
    """(instruction, category) for a random feasible edit of `scene`, or None."""
    names, free = cell_names(config.grid), free_cells(scene, config.grid)
    for category in rng.permutation(list(config.categories)):
        template = pick(rng, INSTRUCTIONS[category])
        obj = pick(rng, scene.objects)
        fill = {"obj": refer(obj, scene, rng, config)}
        if category in ("color_alter", "subject-add", "subject-replace"):
            fill["color"] = pick(rng, [c for c in COLORS if category != "color_alter" or c != obj.color])
            fill["shape"] = pick(rng, [s for s in SHAPES if category != "subject-replace" or s != obj.shape])
        if category == "subject-add":
            if not free:
                continue
            fill["pos"] = names[pick(rng, free)]
        if category == "background_change":
            fill["bg"] = pick(rng, [b for b in BACKGROUNDS if b != scene.background])
        if category == "motion_change":
            dirs = [d for d, (dr, dc) in DIRECTIONS.items()
                    if (obj.cell[0] + dr, obj.cell[1] + dc) in free]
            if not dirs:
                continue
            fill["dir"] = pick(rng, dirs)
        return template.format(**fill), str(category)
    return None


# =========================================================================================
# 5. Principles: question templates (parsed back by ground truth and the simulated VLMs)
# =========================================================================================
QUESTIONS = {  # kind -> template
    "recolored": "Is the {shape} at {pos} now {color}?",
    "has": "Is there a {color} {shape} at {pos}?",
    "moved": "Is the {color} {shape} now at {pos}?",
    "empty": "Is the {pos} cell now empty?",
    "bg_now": "Is the background now {bg}?",
    "kept": "Is the {color} {shape} at {pos} unchanged?",
    "bg_kept": "Is the background unchanged?",
    "no_others": "Were no other objects added or removed?",
    "clean": "Is the image free of noise?",
}


def parse_question(question: str, config: WorldConfig = DEFAULT):
    """(kind, fields) of a question written from QUESTIONS, or (None, {})."""
    for kind, t in QUESTIONS.items():
        f = match_template(t, question, config.grid)
        if f is not None:
            return kind, f
    return None, {}


def principles_for(scene: Scene, instruction: str, config: WorldConfig = DEFAULT) -> list | None:
    """The exact principles of (source scene, instruction), paper format, or None.

    Follow (1-2): the requested change. Keep: one per object the edit must not touch, the
    background (unless it is the edit) and "no other objects added or removed". Quality: 1.
    """
    spec = parse_instruction(instruction, scene, config)
    if spec is None:
        return None
    n, cat, Q = cell_names(config.grid), spec["category"], QUESTIONS
    obj = object_at(scene, spec["cell"]) if spec["cell"] else None
    if cat == "color_alter":
        follow = [Q["recolored"].format(shape=obj.shape, pos=n[obj.cell], color=spec["color"])]
    elif cat in ("subject-add", "subject-replace"):  # the new object stands where asked
        where = spec["to"] if cat == "subject-add" else obj.cell
        follow = [Q["has"].format(color=spec["color"], shape=spec["shape"], pos=n[where])]
    elif cat == "subject-remove":
        follow = [Q["empty"].format(pos=n[obj.cell])]
    elif cat == "background_change":
        follow = [Q["bg_now"].format(bg=spec["background"])]
    else:  # motion_change: the object arrived, and it left its old cell
        follow = [Q["moved"].format(color=obj.color, shape=obj.shape, pos=n[spec["to"]]),
                  Q["empty"].format(pos=n[obj.cell])]
    keep = [Q["kept"].format(color=o.color, shape=o.shape, pos=n[o.cell])
            for o in scene.objects if o.cell not in involved_cells(spec)]
    keep += ([] if cat == "background_change" else [Q["bg_kept"]]) + [Q["no_others"]]
    return ([{"question": t, "category": "follow"} for t in follow] +
            [{"question": t, "category": "keep"} for t in keep] +
            [{"question": Q["clean"], "category": "quality"}])


# =========================================================================================
# 6. Ground truth
# =========================================================================================
def check_principles(source: Scene, spec: dict, principles: list, edited: Scene, noisy: bool,
                     config: WorldConfig = DEFAULT) -> list:
    """0/1 per principle from scenes (true ones for ground truth; the simulated VLMs pass
    their own, possibly wrong, perceptions). Raises on a question not from QUESTIONS."""
    out, grid = [], config.grid
    for p in principles:
        kind, f = parse_question(p["question"], config)
        cell = cell_from_name(f["pos"], grid) if "pos" in f else None
        o = object_at(edited, cell) if cell else None
        # the asked shape is there if it is the best reading or an equally good one (Obj.also)
        shape_ok = o is not None and (o.shape == f.get("shape") or f.get("shape") in o.also)
        if kind in ("recolored", "has", "moved", "kept"):
            ok = shape_ok and o.color == f["color"]
        elif kind == "empty":
            ok = o is None
        elif kind == "bg_now":
            ok = edited.background == f["bg"]
        elif kind == "bg_kept":
            ok = edited.background == source.background
        elif kind == "no_others":  # occupancy unchanged in every cell the edit may not touch
            cells = [(r, c) for r in range(grid) for c in range(grid)]
            ok = all((object_at(edited, x) is None) == (object_at(source, x) is None)
                     for x in cells if x not in involved_cells(spec))
        elif kind == "clean":
            ok = not noisy
        else:
            raise ValueError(f"not a mini-world question: {p['question']!r}")
        out.append(int(ok))
    return out


def ground_truth(source_image, instruction: str, principles: list, edited_image,
                 config: WorldConfig = DEFAULT) -> list:
    """Exact 0/1 per principle, from perception of both images and the text only."""
    source = perceive(source_image, config)
    spec = parse_instruction(instruction, source, config)
    if spec is None:
        raise ValueError(f"not a mini-world instruction for this image: {instruction!r}")
    return check_principles(source, spec, principles, perceive(edited_image, config),
                            is_noisy(edited_image, config), config)


def utility_from_verdicts(verdicts: list, principles: list, noop: bool) -> float:
    """0 for a no-op, else clip(10 - 4*F - 5*K - 2*Q, 0, 10) (see the module docstring).

    >>> ps = [{"category": c} for c in ("follow", "keep", "keep", "quality")]
    >>> utility_from_verdicts([1, 1, 1, 1], ps, False), utility_from_verdicts([1, 0, 1, 0], ps, False)
    (10.0, 3.0)
    """
    if noop:
        return 0.0
    cost = {"follow": 4.0, "keep": 5.0, "quality": 2.0}
    lost = sum(cost[p["category"]] for v, p in zip(verdicts, principles) if not v)
    return float(min(10.0, max(0.0, 10.0 - lost)))


def utility(source_image, instruction: str, principles: list | None, edited_image,
            config: WorldConfig = DEFAULT) -> float:
    """The world's true quality of an edit, 0..10 (principles=None: the world's own)."""
    source = perceive(source_image, config)
    principles = principles or principles_for(source, instruction, config)
    verdicts = ground_truth(source_image, instruction, principles, edited_image, config)
    return utility_from_verdicts(verdicts, principles, perceive(edited_image, config) == source)


# =========================================================================================
# 7. Splits and contexts
# =========================================================================================
def split_of(scene: Scene, config: WorldConfig = DEFAULT) -> str:
    """train / val / test from a hash of the source scene itself: a held-out scene never
    appears in training, whatever seed or instruction it comes with."""
    h = int(hashlib.sha256(describe(scene, config).encode()).hexdigest()[:8], 16) / 2 ** 32
    train, val, _ = config.split_fractions
    return "train" if h < train else "val" if h < train + val else "test"


def sample_scene(rng, config: WorldConfig = DEFAULT, backgrounds=None) -> Scene:
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    cells = [(r, c) for r in range(config.grid) for c in range(config.grid)]
    picked = rng.choice(len(cells), size=n, replace=False)
    objs = [Obj(pick(rng, SHAPES), pick(rng, COLORS), cells[i]) for i in picked]
    return make_scene(pick(rng, backgrounds or config.source_backgrounds), objs)


def sample_context(rng, config: WorldConfig = DEFAULT, split: str | None = None) -> dict:
    """One (source, instruction) task with its exact target and principles.

    Keys: split, category, instruction, source / target (Scene), source_image /
    target_image (PIL), principles. Only source scenes of `split` are drawn (if given)."""
    while True:
        source = sample_scene(rng, config)
        if split is not None and split_of(source, config) != split:
            continue
        drawn = sample_instruction(rng, source, config)
        if drawn is None:
            continue
        instruction, category = drawn
        target = apply_edit(source, parse_instruction(instruction, source, config))
        return {"split": split_of(source, config), "category": category,
                "instruction": instruction, "source": source, "target": target,
                "source_image": render(source, config), "target_image": render(target, config),
                "principles": principles_for(source, instruction, config)}


def sample_contexts(split: str, n: int, seed: int = 0, config: WorldConfig = DEFAULT) -> list:
    """n contexts of one split, deterministic in (split, seed); each gets an "id"."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    out = []
    for i in range(n):
        ctx = sample_context(rng, config, split)
        ctx["id"] = f"{split}-{seed}-{i}"
        out.append(ctx)
    return out
