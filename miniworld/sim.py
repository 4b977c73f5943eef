"""miniworld/sim.py -- the simulated actors of the mini world: editors, a VLM pool, an
inspector, a decomposer, GEdit-style judges and a human rater.

Every actor sees only what its real counterpart sees: PIL images and instruction text, and
for the VLMs the chat messages built by common.py (`verify_messages`, `inspector_messages`,
`decompose_messages`, `judge_*_messages`). They perceive pixels with world.perceive(), so
they work on any image, including one a diffusion model drew. The stage scripts never need
this file's internals: common.make_backend("mini:<name>") calls make_chat().

API
  edit(editor, source_image, instruction, rng, config=DEFAULT) -> PIL.Image
  verifier(member, messages, images, temperature, rng, config=DEFAULT) -> str (RRM format)
  inspector(messages, images, rng, config=DEFAULT) -> str   '{"gold": [{question, gold, reason}]}'
  decomposer(messages, images, config=DEFAULT) -> str       JSON array of principles
  judge(messages, images, rng, config=DEFAULT) -> str       GEdit SC / PQ JSON, or <score>x</score>
  simulate_chat(role, member, messages, images, temperature=0.0, rng=None, config=DEFAULT) -> str
      role in ROLES = ("verifier", "inspector", "decomposer", "judge"); member is used by
      "verifier" only (a key of MEMBERS); images are PIL images in slot order (source first).
  make_chat(name, seed=0, config=DEFAULT) -> chat(requests, n, temperature, max_tokens)
      the common.make_backend("mini:<name>") backend; name = a member or a non-verifier role
  prefer(source, instruction, principles, img_a, img_b, rng, noise=0.0, same_margin=0.5,
         config=DEFAULT) -> "a" | "b" | "same"
  oracle(requests, principles_list, seeds, blind=None, config=DEFAULT) -> list[dict]
      the world's exact verdicts as parsed judge answers (flow_grpo.py --reward_backend mini:truth)
  POOL: the (member, prompt variant, temperature) triples of the VLM pool (12)
  text_corpus(n_contexts=200, seed=0, config=DEFAULT) -> list[str]   (tokenizer training)
  save_grid(path, n_rows=4, seed=0, config=DEFAULT)                  (docs picture)

Editors (EDITORS; an outcome is drawn per call, then noise independently):
  | editor   | correct | wrong parameter | wrong object | over-edit | partial | no-op |
  | faithful |   .80   |       .15       |              |           |         |  .05  |
  | sloppy   |   .35   |       .10       |     .25      |    .30    |         |       |
  | lazy     |   .40   |                 |              |           |   .25   |  .35  |
  wrong parameter: other colour / shape / background / direction; "remove" recolours instead;
  add and replace draw the right colour in a wrong shape half the time (SHAPE_SHARE), else a
  wrong colour. wrong object: the same edit on another object (add: another cell). over-edit:
  the edit plus an unrequested change to an object that must stay (OVER_EDIT: recolour .4,
  reshape .3, removal .3). Shape errors are there so that a judge trained on these
  candidates must look at shapes, not only colours and places (session 7: with colour-only
  errors, the SFT-RRM passed every shape-only failure, and Flow-GRPO's editor learnt to let
  the shapes it must keep drift, unseen; README, flow_grpo.py section).
  partial: a move copies (the object stays at its old cell too), a replace only recolours;
  other categories fall back to wrong parameter. Every editor adds Gaussian noise
  (config.noise_sigma) with the SAME probability NOISE_PROB = 0.3, independent of the
  outcome: "noisy" says nothing about "correct" (the derisk's shortcut, avoided).

VLM pool members (MEMBERS): systematic biases, implemented in what the member *perceives*
so that its reasoning, points and score agree with each other:
  | member  | keep_miss | wishful | noise_blind | final score (0 when it sees a no-op)      |
  | lenient |    .50    |   .05   |     .05     | 10 x mean(points)                         |
  | eager   |    .10    |   .40   |     .05     | 10 x mean(Follow points) - 3 if it sees   |
  |         |           |         |             | noise; Keep is ignored                    |
  | blind   |    .10    |   .05   |     .90     | 10 x mean(points)                         |
  Each is one coin per trajectory. keep_miss: every cell (and the background) the edit
  had to leave alone is seen as in the source, so an unrequested change gets a Keep "yes".
  wishful: the cells the edit had to change are seen as in the target, so a missed change
  gets a Follow "yes". noise_blind: a noisy image is seen as clean (a Quality "yes").
  Temperature T adds random misperception: each object of each image gets a wrong colour
  or shape with p = 0.01 + 0.09*T. The "strict" prompt variant turns each Follow/Keep
  "yes" into "unsure, no" with p = 0.2. Scores are rounded to 0.5.
  Measured (1200 val edits by today's editors, shape errors included; T=0, compact prompt;
  session 8; tests/test_miniworld.py re-checks them), false-"yes" rate when the truth is
  "no", lenient / eager / blind: Keep .42 / .14 / .16, Follow .07 / .38 / .03, Quality
  .08 / .05 / .90; a true "yes" is said "no" < 1% of the time (strict: ~20%). (Session 6's
  colour-only editors: Keep .54 / .10 / .12, Follow .05 / .38 / .07, Quality .04 / .05 / .89.)
Reasoning (verifier): per question, what the member saw at the place the question is about,
what the question wants there, then the verdict, so the verdict compares two phrases side
by side:
    "q1 top left: want green circle, see green circle, yes. q2 center: want red square,
     see blue square, no. q3 background: want grey, see grey, yes. q4 other cells: want
     same, see top right added, no. q5 noise: want none, see noisy, no."
("other cells": the cells the edit had to leave alone whose occupancy changed). With
CHANGE_LINE (env MINIWORLD_CHANGE_LINE=1, an ablation) the reasoning opens with what the member
saw change, in the RRM base's pretraining words (world.describe_change, miniworld/pretrain_rrm.py
task 1): "changed: top left red circle -> green circle. q1 ..." or, for an edit it sees as a
no-op (score 0), "changed: nothing. q1 ..."; without it a no-op's reasoning ends "nothing
changed." (says_noop() reads both). With DESCRIBE_IMAGES = True the
reasoning first describes both images in full ("source: ... edited: ..."); the default
leaves that out: it doubles the answer's length, and with it the same 250 SFT steps gave
held-out pairwise accuracy 0.16 instead of 0.28 (80 val pairs, one seed).
Why these biases: (a) a pool trajectory picked without verification inherits them;
(b) the inspector's gold labels remove most point errors when the best-verified trajectory
is selected; (c) even the selected trajectories' final scores (means of points) charge a
Keep violation about 10/K points while world.utility charges 5, so preference RL (GCPO)
has something to fix. Measured on 150 contexts x 3 editors with the full POOL: per-point
accuracy of a random trajectory .87, of the inspector-selected one .98; pairwise accuracy
on the true preference pairs (ties count wrong) .65 for a random trajectory's score, .78
for the selected one's (the paper's Think / Think+Verify: 68.9 / 75.4).

Inspector: true perception, then each gold label flips with INSPECTOR_FLIP = 0.04 (it
ignores the candidate trajectories). Decomposer: exact world.principles_for. Judges: SC =
[10 x Follow pass rate (0 for a no-op), 10 - 5 x Keep failures], PQ = [10, 10 - noise_level],
scalar = the lenient member's score without reasoning. Human rater: world.utility, "same"
when the utilities differ by less than same_margin, optional label-noise flips.
"""
from __future__ import annotations

import json
import os
import re
import textwrap

import numpy as np
from PIL import Image, ImageDraw

from common import (CATEGORY_DISPLAY, DECOMPOSE_SYSTEM, INSPECT_SYSTEM, PQ_SYSTEM,
                    SC_SYSTEM, SCALAR_SYSTEM, VERIFY_SYSTEMS, decompose_messages,
                    format_principles, format_rrm_output, inspector_messages,
                    normalize_category, verify_messages)
from miniworld.world import (BACKGROUNDS, COLORS, DEFAULT, DIRECTIONS, SHAPES, Obj,
                             WorldConfig, add_noise, apply_edit, cell_from_name, cell_names, check_principles, describe_change,
                             describe, free_cells, ground_truth, involved_cells, is_noisy, make_scene,
                             noise_level, object_at, parse_instruction, parse_question,
                             perceive, pick, principles_for, render, sample_contexts, utility)

# =========================================================================================
# 1. Editors
# =========================================================================================
EDITORS = {
    "faithful": {"correct": .80, "wrong_param": .15, "noop": .05},
    "sloppy": {"correct": .35, "wrong_param": .10, "wrong_object": .25, "over_edit": .30},
    "lazy": {"correct": .40, "partial": .25, "noop": .35},
}
NOISE_PROB = 0.3  # the same for every editor, drawn independently of the outcome
SHAPE_SHARE = 0.5  # add / replace with a wrong parameter: a wrong shape (else a wrong colour)
OVER_EDIT = {"recolour": 0.4, "reshape": 0.3, "remove": 0.3}  # the unrequested change to a kept object


def _wrong_param(spec, src, rng, config):
    """The same edit with one parameter wrong, or None if there is no other choice."""
    cat = spec["category"]
    if cat == "background_change":
        bg = pick(rng, [b for b in BACKGROUNDS if b not in (spec["background"], src.background)])
        return {**spec, "background": bg} if bg else None
    if cat == "motion_change":
        (r, c), free = spec["cell"], free_cells(src, config.grid)
        to = pick(rng, [(r + dr, c + dc) for dr, dc in DIRECTIONS.values()
                         if (r + dr, c + dc) in free and (r + dr, c + dc) != spec["to"]])
        return {**spec, "to": to} if to else None
    if cat == "subject-remove":  # recolours the object instead of removing it
        old = object_at(src, spec["cell"]).color
        return {**spec, "category": "color_alter", "color": pick(rng, [c for c in COLORS if c != old])}
    if cat in ("subject-add", "subject-replace") and rng.random() < SHAPE_SHARE:
        # add, replace: the right colour in a wrong shape (never the old object itself: no no-op)
        o = object_at(src, spec["cell"]) if cat == "subject-replace" else None
        shapes = [s for s in SHAPES if s != spec["shape"] and not (o and (s, spec["color"]) == (o.shape, o.color))]
        return {**spec, "shape": pick(rng, shapes)}
    # colour-alter, add, replace: a wrong colour (never the object's old colour: no no-op)
    old = object_at(src, spec["cell"]).color if cat == "color_alter" else None
    return {**spec, "color": pick(rng, [c for c in COLORS if c not in (spec["color"], old)])}


def _wrong_object(spec, src, rng, config):
    """The same edit applied to another object (or cell), or None if impossible."""
    s, cat = dict(spec), spec["category"]
    if cat == "background_change":
        return None
    if cat == "subject-add":
        s["to"] = pick(rng, [x for x in free_cells(src, config.grid) if x != spec["to"]])
        return s if s["to"] else None
    others = [o for o in src.objects if o.cell != spec["cell"] and
              not (cat == "color_alter" and o.color == spec["color"])]
    if cat == "motion_change":  # the other object must be able to make the same move
        dr, dc = spec["to"][0] - spec["cell"][0], spec["to"][1] - spec["cell"][1]
        free = free_cells(src, config.grid)
        others = [o for o in others if (o.cell[0] + dr, o.cell[1] + dc) in free]
        o = pick(rng, others)
        return {**s, "cell": o.cell, "to": (o.cell[0] + dr, o.cell[1] + dc)} if o else None
    o = pick(rng, others)
    return {**s, "cell": o.cell} if o else None


def _editor_scene(outcome, spec, src, rng, config):
    """The scene an editor produces for a drawn outcome (see the table in the docstring)."""
    if outcome == "noop":
        return src
    if outcome == "wrong_object":
        wrong = _wrong_object(spec, src, rng, config) or _wrong_param(spec, src, rng, config)
        return apply_edit(src, wrong) if wrong else src
    if outcome == "partial" and spec["category"] == "motion_change":  # copy instead of move
        return make_scene(src.background, apply_edit(src, spec).objects + (object_at(src, spec["cell"]),))
    if outcome == "partial" and spec["category"] == "subject-replace":  # only the colour
        return apply_edit(src, {**spec, "category": "color_alter"})
    if outcome in ("wrong_param", "partial"):
        wrong = _wrong_param(spec, src, rng, config)
        return apply_edit(src, wrong) if wrong else src
    done = apply_edit(src, spec)  # "correct" and "over_edit" start from the right edit
    if outcome == "over_edit":
        kept = [o for o in done.objects if o.cell not in involved_cells(spec)]
        o = pick(rng, kept)
        if o is None:
            return done
        u = rng.random()
        if u < OVER_EDIT["recolour"]:
            new = Obj(o.shape, pick(rng, [c for c in COLORS if c != o.color]), o.cell)
        elif u < OVER_EDIT["recolour"] + OVER_EDIT["reshape"]:
            new = Obj(pick(rng, [s for s in SHAPES if s != o.shape]), o.color, o.cell)
        else:
            return make_scene(done.background, [x for x in done.objects if x.cell != o.cell])
        return make_scene(done.background, [new if x.cell == o.cell else x for x in done.objects])
    return done


def edit(editor: str, source_image, instruction: str, rng, config: WorldConfig = DEFAULT):
    """A candidate edit by a simulated editor: perceive -> (mis)apply -> render -> noise?"""
    src = perceive(source_image, config)
    spec = parse_instruction(instruction, src, config)
    profile = EDITORS[editor]
    outcome = rng.choice(list(profile), p=list(profile.values()))
    scene = _editor_scene(outcome, spec, src, rng, config) if spec else src
    image = render(scene, config)
    if rng.random() < NOISE_PROB:  # drawn after and independently of the outcome
        image = add_noise(image, config.noise_sigma, rng)
    return image


# =========================================================================================
# 2. Reading chat messages (the format of common.py's message builders)
# =========================================================================================
def _text(message) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content if part.get("type") == "text")


def read_prompt(messages) -> dict:
    """{"system", "instruction", "principles"} from messages of common.py's builders: the
    user text holds "Instruction: ..." and "Questions:\\n1. [Category] question" lines."""
    system = "\n".join(_text(m) for m in messages if m["role"] == "system")
    user = "\n".join(_text(m) for m in messages if m["role"] == "user")
    found = re.findall(r"^Instruction: (.*)$", user, re.M)
    questions = user.split("Questions:", 1)[1] if "Questions:" in user else ""
    principles = []
    for line in questions.strip().splitlines():
        m = re.match(r"\s*\d+\.\s*\[(.+?)\]\s*(.+)$", line)
        if not m:
            break  # the numbered list ends where the candidates (inspector) begin
        category = normalize_category(m[1]) or "follow"
        principles.append({"question": m[2].strip(), "category": category})
    return {"system": system, "instruction": found[-1].strip() if found else "",
            "principles": principles}


def _verdicts(source, spec, principles, edited, noisy, config):
    """check_principles per question; a question the world cannot read gets 0 ("unsure")."""
    return [check_principles(source, spec, [p], edited, noisy, config)[0]
            if parse_question(p["question"], config)[0] else 0 for p in principles]


# =========================================================================================
# 3. The VLM pool (verifier role)
# =========================================================================================
MEMBERS = {
    "lenient": {"keep_miss": .50, "wishful": .05, "noise_blind": .05, "score": "mean"},
    "eager": {"keep_miss": .10, "wishful": .40, "noise_blind": .05, "score": "follow"},
    "blind": {"keep_miss": .10, "wishful": .05, "noise_blind": .90, "score": "mean"},
}
MISPERCEIVE = (0.01, 0.09)   # per object and image: p = a + b * temperature
STRICT_DOUBT = 0.2           # "strict" prompt: P(a Follow/Keep "yes" becomes "unsure, no")
PROMPT_VARIANTS = ("compact", "strict")
TEMPERATURES = (0.3, 1.0)
POOL = [(m, v, t) for m in MEMBERS for v in PROMPT_VARIANTS for t in TEMPERATURES]


def _misperceive(scene, p, rng):
    objs = []
    for o in scene.objects:
        if rng.random() < p:  # a wrong colour or a wrong shape
            if rng.random() < 0.5:
                o = Obj(o.shape, pick(rng, [c for c in COLORS if c != o.color]), o.cell)
            else:
                o = Obj(pick(rng, [s for s in SHAPES if s != o.shape]), o.color, o.cell)
        objs.append(o)
    return make_scene(scene.background, objs)


def member_view(member, source, edited, noisy, spec, temperature, rng, config=DEFAULT):
    """What a pool member believes the two images show: (source, edited, noisy)."""
    prof, target, inv = MEMBERS[member], apply_edit(source, spec), involved_cells(spec)
    # One coin per trajectory for each bias, so a biased look overlooks (or imagines) the
    # whole of a change, and a per-question error rate equals the documented probability.
    overlook = rng.random() < prof["keep_miss"]   # misses every unrequested change
    imagine = rng.random() < prof["wishful"]      # sees the requested change as done
    cells = [(r, c) for r in range(config.grid) for c in range(config.grid)]
    seen = {}
    for x in cells:
        o = object_at(edited, x)
        if x not in inv and overlook:
            o = object_at(source, x)
        if x in inv and imagine:
            o = object_at(target, x)
        if o is not None:
            seen[x] = o
    bg, is_bg_edit = edited.background, spec["category"] == "background_change"
    if (not is_bg_edit and overlook) or (is_bg_edit and imagine):
        bg = target.background  # the target keeps the source background unless it is the edit
    p = MISPERCEIVE[0] + MISPERCEIVE[1] * temperature
    return (_misperceive(source, p, rng), _misperceive(make_scene(bg, seen.values()), p, rng),
            noisy and rng.random() >= prof["noise_blind"])


DESCRIBE_IMAGES = False  # True: the reasoning first describes both images in full (see the docstring)
# True (env MINIWORLD_CHANGE_LINE=1, an ablation): the reasoning opens with what the member saw
# change, in the RRM base's pretraining words (see the docstring)
CHANGE_LINE = os.environ.get("MINIWORLD_CHANGE_LINE", "0") == "1"


def _observe(question, src, ed, noisy, spec, config):
    """One question's reasoning from the member's own view (src, ed, noisy): the place the
    question is about, what the question wants there, and what the member sees there --
    "right: want red circle, see blue circle" -- so that the verdict after it is a plain
    comparison of two phrases side by side (Follow / Keep: the cell's content in the edited
    image; the background; the cells the edit had to leave alone; the noise)."""
    kind, f = parse_question(question, config)
    names = cell_names(config.grid)

    def at(scene, pos):
        o = object_at(scene, cell_from_name(pos, config.grid))
        return f"{o.color} {o.shape}" if o else "empty"
    if kind == "recolored":
        place, want, see = f["pos"], f"{f['color']} {f['shape']}", at(ed, f["pos"])
    elif kind in ("has", "moved", "kept"):
        place, want, see = f["pos"], f"{f['color']} {f['shape']}", at(ed, f["pos"])
    elif kind == "empty":
        place, want, see = f["pos"], "empty", at(ed, f["pos"])
    elif kind == "bg_now":
        place, want, see = "background", f["bg"], ed.background
    elif kind == "bg_kept":
        place, want, see = "background", src.background, ed.background
    elif kind == "no_others":
        inv = involved_cells(spec)
        diff = [f"{names[x]} {'added' if object_at(src, x) is None else 'removed'}"
                for x in sorted(names) if x not in inv
                and (object_at(src, x) is None) != (object_at(ed, x) is None)]
        place, want, see = "other cells", "same", ", ".join(diff) if diff else "same"
    elif kind == "clean":
        place, want, see = "noise", "none", "noisy" if noisy else "none"
    else:
        return "unknown question"
    return f"{place}: want {want}, see {see}"


def says_noop(text: str) -> bool:
    """Whether a trajectory calls the edit a no-op, in either wording of verifier()."""
    return "changed: nothing." in text or "nothing changed." in text


def member_score(member, points, principles, noop) -> float:
    """The member's own (biased) aggregate of its points, 0..10 in steps of 0.5."""
    if noop or not points:
        return 0.0
    if MEMBERS[member]["score"] == "mean":
        s = 10 * sum(points) / len(points)
    else:  # "follow": only the requested change counts, noise costs 3, Keep is ignored
        fol = [v for v, p in zip(points, principles) if p["category"] == "follow"] or [0]
        bad_q = any(not v for v, p in zip(points, principles) if p["category"] == "quality")
        s = 10 * sum(fol) / len(fol) - 3 * bad_q
    return round(min(10.0, max(0.0, s)) * 2) / 2


def verifier(member, messages, images, temperature=0.0, rng=None, config: WorldConfig = DEFAULT) -> str:
    """One pool trajectory: '<think>what each image shows; q1 ...: yes ...</think><points>..'"""
    rng = rng if rng is not None else np.random.default_rng()
    prompt = read_prompt(messages)
    principles, strict = prompt["principles"], "strict" in prompt["system"].lower()
    source = perceive(images[0], config)
    spec = parse_instruction(prompt["instruction"], source, config)
    if spec is None or not principles:
        return format_rrm_output("I cannot read the instruction.", [0] * len(principles), 0)
    src, ed, noisy = member_view(member, source, perceive(images[1], config),
                                 is_noisy(images[1], config), spec, temperature, rng, config)
    points = _verdicts(src, spec, principles, ed, noisy, config)
    checks = []
    for i, (p, v) in enumerate(zip(principles, points)):
        doubt = strict and v and p["category"] != "quality" and rng.random() < STRICT_DOUBT
        points[i] = 0 if doubt else v
        checks.append(f"q{i + 1} {_observe(p['question'], src, ed, noisy, spec, config)}, "
                      f"{'unsure, no' if doubt else 'yes' if v else 'no'}.")
    noop = ed == src
    if CHANGE_LINE:  # first what the member sees changed ("changed: nothing" for a no-op), then the checks
        reasoning = f"changed: {describe_change(src, ed, config)}. " + " ".join(checks)
    else:
        reasoning = " ".join(checks) + (" nothing changed." if noop else "")
    if DESCRIBE_IMAGES:
        reasoning = (f"source: {describe(src, config)}. edited: {describe(ed, config)}"
                     f"{'; noisy' if noisy else ''}. " + reasoning)
    return format_rrm_output(reasoning, points, member_score(member, points, principles, noop))


# =========================================================================================
# 4. Inspector, decomposer, judges
# =========================================================================================
INSPECTOR_FLIP = 0.04  # P(a gold label is wrong), independent per principle


def inspector(messages, images, rng=None, config: WorldConfig = DEFAULT) -> str:
    """Gold 0/1 per principle with a one-line reason, from true perception (ignores the
    candidate trajectories in the text), each label flipped with INSPECTOR_FLIP."""
    rng = rng if rng is not None else np.random.default_rng()
    prompt = read_prompt(messages)
    source, edited = perceive(images[0], config), perceive(images[1], config)
    spec = parse_instruction(prompt["instruction"], source, config)
    gold = (_verdicts(source, spec, prompt["principles"], edited, is_noisy(images[1], config), config)
            if spec else [0] * len(prompt["principles"]))
    out = []
    for i, (p, g) in enumerate(zip(prompt["principles"], gold), 1):
        kind, f = parse_question(p["question"], config)
        if "pos" in f:
            o = object_at(edited, cell_from_name(f["pos"], config.grid))
            reason = f"{f['pos']} holds {'a ' + o.color + ' ' + o.shape if o else 'nothing'}"
        elif kind in ("bg_now", "bg_kept"):
            reason = f"the background is {edited.background}"
        elif kind == "clean":
            reason = f"noise level {noise_level(images[1], config):.1f}"
        else:
            reason = "objects outside the edit " + ("kept" if g else "added or removed")
        flip = int(rng.random() < INSPECTOR_FLIP)
        out.append({"question": i, "gold": g ^ flip, "reason": reason})
    if '"changed"' not in prompt["system"]:
        return json.dumps({"gold": out})
    # asked whether anything changed (build_data.py --noop_check): the scene as seen, with
    # the same error rate as a gold label; noise alone is not a change (world.utility's no-op)
    changed = (edited != source) ^ bool(rng.random() < INSPECTOR_FLIP)
    return json.dumps({"gold": out, "changed": changed})


def decomposer(messages, images, config: WorldConfig = DEFAULT) -> str:
    """The exact principles of (source image, instruction), paper category names."""
    instruction = read_prompt(messages)["instruction"]
    principles = principles_for(perceive(images[0], config), instruction, config)
    if not principles:
        return "I cannot turn this instruction into checks."
    return json.dumps([{"question": p["question"], "category": CATEGORY_DISPLAY[p["category"]]}
                       for p in principles])


def judge(messages, images, rng=None, config: WorldConfig = DEFAULT) -> str:
    """GEdit-style judges (common.SC_SYSTEM / PQ_SYSTEM) and the scalar scorer (SCALAR_SYSTEM)."""
    rng = rng if rng is not None else np.random.default_rng()
    prompt = read_prompt(messages)
    if prompt["system"] == PQ_SYSTEM:
        b = round(min(10.0, max(0.0, 10 - noise_level(images[0], config))), 1)
        return json.dumps({"reasoning": "flat shapes; noise measured", "score": [10, b]})
    source = perceive(images[0], config)
    principles = principles_for(source, prompt["instruction"], config)
    if principles is None:
        return "I cannot read the instruction."
    if prompt["system"] == SCALAR_SYSTEM:  # a global scorer: a pool member without reasoning
        msgs = verify_messages(prompt["instruction"], principles, "compact")
        return re.search(r"<score>.*</score>", verifier("lenient", msgs, images, 1.0, rng, config))[0]
    gt = ground_truth(images[0], prompt["instruction"], principles, images[1], config)
    fol = [g for g, p in zip(gt, principles) if p["category"] == "follow"]
    keep_fail = sum(1 - g for g, p in zip(gt, principles) if p["category"] == "keep")
    a = 0.0 if perceive(images[1], config) == source else 10 * sum(fol) / len(fol)
    return json.dumps({"reasoning": f"{sum(fol)}/{len(fol)} requested changes, {keep_fail} "
                                    f"unrequested", "score": [round(a, 1), max(0, 10 - 5 * keep_fail)]})


ROLES = ("verifier", "inspector", "decomposer", "judge")


def simulate_chat(role, member, messages, images, temperature=0.0, rng=None,
                  config: WorldConfig = DEFAULT) -> str:
    """One entry point for a backend: (role, member, messages, images) -> text."""
    if role == "verifier":
        return verifier(member, messages, images, temperature, rng, config)
    if role == "inspector":
        return inspector(messages, images, rng, config)
    if role == "decomposer":
        return decomposer(messages, images, config)
    if role == "judge":
        return judge(messages, images, rng, config)
    raise ValueError(f"unknown role {role!r}; use one of {ROLES}")


def make_chat(name: str, seed: int = 0, config: WorldConfig = DEFAULT, **_):
    """The backend behind common.make_backend("mini:<name>"): a function
    chat(requests, n=1, temperature=0.0, max_tokens=512) -> n texts per request, a request
    being (messages, images). name: a pool member (verifier role, see MEMBERS) or one of
    "inspector", "decomposer", "judge". Draws come from one generator seeded by `seed`;
    max_tokens is ignored (simulated answers are short)."""
    role = name if name in ("inspector", "decomposer", "judge") else "verifier"
    if role == "verifier" and name not in MEMBERS:
        raise ValueError(f"unknown mini-world VLM {name!r}: use one of "
                         f"{list(MEMBERS) + ['inspector', 'decomposer', 'judge']}")
    rng = np.random.default_rng(seed)

    def chat(requests, n=1, temperature=0.0, max_tokens=512):
        return [[simulate_chat(role, name, messages, images, temperature, rng, config)
                 for _ in range(n)] for messages, images in requests]
    return chat


# =========================================================================================
# 5. Human rater
# =========================================================================================
def prefer(source, instruction, principles, img_a, img_b, rng=None, noise: float = 0.0,
           same_margin: float = 0.5, config: WorldConfig = DEFAULT) -> str:
    """'a' / 'b' by true utility; 'same' if they differ by less than same_margin; with
    probability `noise` an 'a'/'b' label is flipped (label noise of real annotators)."""
    ua = utility(source, instruction, principles, img_a, config)
    ub = utility(source, instruction, principles, img_b, config)
    if abs(ua - ub) < same_margin:
        return "same"
    label = "a" if ua > ub else "b"
    if noise and (rng if rng is not None else np.random.default_rng()).random() < noise:
        label = "b" if label == "a" else "a"
    return label


def oracle(requests, principles_list, seeds, blind: dict | None = None,
           config: WorldConfig = DEFAULT) -> list[dict]:
    """The world's exact verdicts as a judge's parsed answers (flow_grpo.py's mini:truth reward
    backend, an ablation): per (source, edited, instruction) request its principles' 0/1
    points, the true utility as its score, and the world's own no-op call (nothing perceived
    changed) for --noop_call. blind = {category: P} corrupts it into a judge with one blind
    spot: each truly failed principle of that category passes with probability P, drawn from
    the edit's seed (README, session 18)."""
    out = []
    for (src, ed, ins), prins, seed in zip(requests, principles_list, seeds):
        pts = ground_truth(src, ins, prins, ed, config)
        if blind:
            draws = np.random.default_rng([seed % 2**32, 1]).random(len(prins))
            pts = [1 if (v == 0 and d < blind.get(p["category"], 0.0)) else v for v, p, d in zip(pts, prins, draws)]
        out.append({"status": "ok", "score": utility(src, ins, prins, ed, config), "points": pts,
                    "says_unchanged": perceive(ed, config) == perceive(src, config)})
    return out


# =========================================================================================
# 6. A text corpus (tokenizer training) and a picture for the docs
# =========================================================================================
def text_corpus(n_contexts: int = 200, seed: int = 0, config: WorldConfig = DEFAULT) -> list:
    """Every kind of text the stages will tokenize: common.py's prompts, descriptions,
    instructions, principles, pool trajectories and inspector answers."""
    rng = np.random.default_rng(seed)
    texts = [*VERIFY_SYSTEMS.values(), DECOMPOSE_SYSTEM, INSPECT_SYSTEM, SC_SYSTEM, PQ_SYSTEM,
             SCALAR_SYSTEM]
    for ctx in sample_contexts("train", n_contexts, seed, config):
        src, ins, ps = ctx["source_image"], ctx["instruction"], ctx["principles"]
        texts += [describe(ctx["source"], config), describe(ctx["target"], config),
                  _text(decompose_messages(ins)[1]), decomposer(decompose_messages(ins), [src], config)]
        for name in EDITORS:
            img = edit(name, src, ins, rng, config)
            member, variant, temp = POOL[rng.integers(len(POOL))]
            msgs = verify_messages(ins, ps, variant)
            traj = verifier(member, msgs, [src, img], temp, rng, config)
            texts += [_text(msgs[1]), traj,
                      inspector(inspector_messages(ins, ps, [traj]), [src, img], rng, config)]
    return texts


def save_grid(path, n_rows: int = 4, seed: int = 0, config: WorldConfig = DEFAULT) -> None:
    """Rows: val contexts; columns: source (with the instruction), target, one candidate per
    editor with its ground-truth verdicts (F/K/Q) and true utility u."""
    rng, scale, text_h = np.random.default_rng(seed), 2, 58
    tile = config.size * scale
    cols = 2 + len(EDITORS)
    sheet = Image.new("RGB", (cols * (tile + 8) + 8, n_rows * (tile + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for r, ctx in enumerate(sample_contexts("val", n_rows, seed, config)):
        src, ins, ps = ctx["source_image"], ctx["instruction"], ctx["principles"]
        cands = [(f"target ({ctx['category']})", ctx["target_image"])]
        cands += [(name, edit(name, src, ins, rng, config)) for name in EDITORS]
        for c, (label, img) in enumerate([("source", src)] + cands):
            x, y = 8 + c * (tile + 8), 8 + r * (tile + text_h + 8)
            sheet.paste(img.resize((tile, tile), Image.Resampling.NEAREST), (x, y))
            if c == 0:
                lines = textwrap.wrap(ins, 30)[:3]
            else:
                gt = ground_truth(src, ins, ps, img, config)
                marks = " ".join(p["category"][0].upper() + str(g) for g, p in zip(gt, ps))
                lines = [label, f"u={utility(src, ins, ps, img, config):g}"] + textwrap.wrap(marks, 30)
            draw.multiline_text((x, y + tile + 2), "\n".join(lines[:4]), fill="black", spacing=1)
    sheet.save(path)
