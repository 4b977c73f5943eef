"""Tests of the mini world (miniworld/world.py, miniworld/sim.py): perception, ground truth,
the simulated actors' documented error rates, splits. Whole file: seconds on 2 CPU cores.

Tolerances on measured rates are about 3 standard errors of the sample sizes used here.
"""
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from common import (judge_pq_messages, judge_sc_messages, parse_inspector, parse_judge,
                    parse_principles, parse_rrm_output, scalar_messages, decompose_messages,
                    inspector_messages, verify_messages, VERIFY_SYSTEMS)
from miniworld import sim, world
from miniworld.world import Obj, make_scene, render, perceive

CFG = world.DEFAULT


def _fail_rate(pairs):
    """pairs of (model point, gold) -> fraction of model 'yes' among gold 'no'."""
    said = [p for p, g in pairs if g == 0]
    return sum(said) / len(said), len(said)


# =========================================================================================
# Perception
# =========================================================================================
def test_perception_exact_on_clean_renders():
    rng = np.random.default_rng(0)
    for cfg, n in ((CFG, 1000), (world.make_config("hard"), 500)):  # 2-3 / 3-4 objects
        for _ in range(n):
            scene = world.sample_scene(rng, cfg, backgrounds=tuple(world.BACKGROUNDS))
            img = render(scene, cfg)
            assert perceive(img, cfg) == scene, world.describe(scene)
            assert world.noise_level(img, cfg) < 1.0


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_perception_robust_to_the_editors_noise(difficulty):
    cfg, rng = world.make_config(difficulty), np.random.default_rng(1)
    for _ in range(150):
        scene = world.sample_scene(rng, cfg, backgrounds=tuple(world.BACKGROUNDS))
        noisy = world.add_noise(render(scene, cfg), cfg.noise_sigma, rng)
        assert perceive(noisy, cfg) == scene
        assert world.is_noisy(noisy, cfg)


def test_world_renders_are_never_ambiguous():
    """Obj.also (shapes within world.SHAPE_TOL of the best fit) stays empty on the world's
    own renders, clean or with the editors' noise, so the build_data gold labels, pairs and
    SFT sets do not depend on it (only drawn edits can be ambiguous)."""
    cfg, rng = world.make_config("medium"), np.random.default_rng(3)
    for _ in range(300):
        scene = world.sample_scene(rng, cfg, backgrounds=tuple(world.BACKGROUNDS))
        for img in (render(scene, cfg), world.add_noise(render(scene, cfg), cfg.noise_sigma, rng)):
            assert all(o.also == () for o in perceive(img, cfg).objects)


def _draw_superellipse(p: float, color: str = "green", bg: str = "white"):
    """A scene image with a hand-drawn shape at the centre: |x|^p + |y|^p <= R^p, the size
    of the world's circle (p = 2 is its disc; p ~ 3 the squarish circles the tiny Kontext
    editor draws after a background change; p -> inf its square)."""
    img = np.array(render(make_scene(bg, [Obj("triangle", "red", (0, 0))]), CFG))
    k = CFG.cell
    y, x = np.mgrid[0:k, 0:k] + 0.5
    R = k / 2 - k // 8
    img[k:2 * k, k:2 * k][np.abs(x - k / 2) ** p + np.abs(y - k / 2) ** p <= R ** p] = world.COLORS[color]
    return Image.fromarray(img)


def test_an_ambiguous_drawing_satisfies_either_reading():
    src = make_scene("grey", [Obj("triangle", "red", (0, 0)), Obj("circle", "green", (1, 1))])
    ins = "change the background to white"
    ps = world.principles_for(src, ins)
    assert ps[2] == {"question": "Is the green circle at center unchanged?", "category": "keep"}
    # 1. a squarish circle: the square template fits a little better, the circle almost as well
    o = world.object_at(perceive(_draw_superellipse(3)), (1, 1))
    assert (o.shape, o.also) == ("square", ("circle",))
    assert world.ground_truth(render(src), ins, ps, _draw_superellipse(3)) == [1, 1, 1, 1, 1]
    q = [{"question": "Is there a green square at center?", "category": "follow"}]
    assert world.ground_truth(render(src), ins, q, _draw_superellipse(3)) == [1]
    # 2. a square in all but its corners is a reshaped circle: Keep fails (utility 10 - 5)
    o = world.object_at(perceive(_draw_superellipse(5)), (1, 1))
    assert (o.shape, o.also) == ("square", ())
    assert world.ground_truth(render(src), ins, ps, _draw_superellipse(5)) == [1, 1, 0, 1, 1]
    assert world.utility(render(src), ins, ps, _draw_superellipse(5)) == 5.0


def test_describe_and_positions():
    scene = make_scene("grey", [Obj("square", "blue", (1, 1)), Obj("circle", "red", (0, 0))])
    assert world.describe(scene) == "grey background; red circle at top left; blue square at center"
    assert [world.cell_names(3)[(r, 2)] for r in range(3)] == ["top right", "right", "bottom right"]
    assert world.cell_from_name("bottom", 3) == (2, 1)
    edited = make_scene("blue", [Obj("square", "blue", (1, 1)), Obj("circle", "green", (0, 0)),
                                 Obj("triangle", "red", (2, 2))])
    assert world.describe_change(scene, scene) == "nothing"
    assert world.describe_change(scene, edited) == ("background grey -> blue; top left red circle -> green circle; "
                                                    "bottom right empty -> red triangle")


# =========================================================================================
# Ground truth of hand-made edits (independent answers written out by hand)
# =========================================================================================
SRC = make_scene("grey", [Obj("circle", "red", (0, 0)), Obj("square", "blue", (1, 1)),
                          Obj("triangle", "green", (2, 2))])


def _with(scene, bg=None, drop=(), put=()):
    objs = {o.cell: o for o in scene.objects}
    for cell in drop:
        objs.pop(cell)
    for o in put:
        objs[o.cell] = o
    return make_scene(bg or scene.background, objs.values())


def test_ground_truth_recolour_edits():
    ins = "make the red circle yellow"
    ps = world.principles_for(SRC, ins)
    assert ps == [
        {"question": "Is the circle at top left now yellow?", "category": "follow"},
        {"question": "Is the blue square at center unchanged?", "category": "keep"},
        {"question": "Is the green triangle at bottom right unchanged?", "category": "keep"},
        {"question": "Is the background unchanged?", "category": "keep"},
        {"question": "Were no other objects added or removed?", "category": "keep"},
        {"question": "Is the image free of noise?", "category": "quality"}]
    good = _with(SRC, put=[Obj("circle", "yellow", (0, 0))])
    rng = np.random.default_rng(0)
    cases = {  # name: (edited image, per-principle ground truth, true utility)
        "correct": (render(good), [1, 1, 1, 1, 1, 1], 10),
        "wrong object": (render(_with(SRC, put=[Obj("square", "yellow", (1, 1))])), [0, 0, 1, 1, 1, 1], 1),
        "wrong colour": (render(_with(SRC, put=[Obj("circle", "purple", (0, 0))])), [0, 1, 1, 1, 1, 1], 6),
        "keep violation: bg": (render(_with(good, bg="white")), [1, 1, 1, 0, 1, 1], 5),
        "keep violation: removal": (render(_with(good, drop=[(2, 2)])), [1, 1, 0, 1, 0, 1], 0),
        "keep violation: addition": (render(_with(good, put=[Obj("square", "red", (0, 2))])),
                                     [1, 1, 1, 1, 0, 1], 5),
        "no-op": (render(SRC), [0, 1, 1, 1, 1, 1], 0),
        "noisy no-op": (world.add_noise(render(SRC), 40, rng), [0, 1, 1, 1, 1, 0], 0),
        "noisy correct": (world.add_noise(render(good), 40, rng), [1, 1, 1, 1, 1, 0], 8),
    }
    for name, (img, gt, u) in cases.items():
        assert world.ground_truth(render(SRC), ins, ps, img) == gt, name
        assert world.utility(render(SRC), ins, ps, img) == u, name


def test_ground_truth_motion_edits():
    ins = "move the blue square one cell to the right"
    ps = world.principles_for(SRC, ins)
    assert [p["question"] for p in ps[:2]] == ["Is the blue square now at right?",
                                               "Is the center cell now empty?"]
    moved = _with(SRC, drop=[(1, 1)], put=[Obj("square", "blue", (1, 2))])
    copied = _with(SRC, put=[Obj("square", "blue", (1, 2))])
    wrong_way = _with(SRC, drop=[(1, 1)], put=[Obj("square", "blue", (0, 1))])
    for scene, gt, u in [(moved, [1, 1, 1, 1, 1, 1, 1], 10), (copied, [1, 0, 1, 1, 1, 1, 1], 6),
                         (wrong_way, [0, 1, 1, 1, 1, 0, 1], 1)]:
        assert world.ground_truth(render(SRC), ins, ps, render(scene)) == gt
        assert world.utility(render(SRC), ins, ps, render(scene)) == u


def test_ground_truth_on_images_not_from_the_renderer():
    """JPEG re-save and a 112-px resize of the target still count as the correct edit."""
    for ctx in world.sample_contexts("val", 40, seed=3):
        buf = io.BytesIO()
        ctx["target_image"].save(buf, "JPEG", quality=75)
        for img in (Image.open(buf), ctx["target_image"].resize((112, 112), Image.Resampling.BILINEAR)):
            gt = world.ground_truth(ctx["source_image"], ctx["instruction"], ctx["principles"], img)
            assert gt == [1] * len(ctx["principles"]), ctx["instruction"]


def test_contexts_are_consistent_and_recoverable():
    ctxs = world.sample_contexts("train", 120, seed=1)
    assert {c["category"] for c in ctxs} == set(world.EDIT_CATEGORIES)
    for c in ctxs:
        src, ins, ps = c["source_image"], c["instruction"], c["principles"]
        assert world.ground_truth(src, ins, ps, c["target_image"]) == [1] * len(ps)
        assert world.utility(src, ins, ps, c["target_image"]) == 10
        assert world.utility(src, ins, ps, src) == 0  # a no-op
        # principles are recoverable from (source image, instruction) alone
        out = parse_principles(sim.decomposer(decompose_messages(ins), [src]))
        assert out["status"] == "ok" and out["principles"] == ps
        assert 1 <= sum(p["category"] == "follow" for p in ps) <= 2


def test_difficulty_presets():
    ctxs = world.sample_contexts("train", 40, config=world.make_config("easy"))
    assert {c["category"] for c in ctxs} <= {"color_alter", "subject-remove"}
    assert all(len(c["source"].objects) == 2 for c in ctxs)


def test_splits_are_disjoint_and_deterministic():
    by_split = {s: world.sample_contexts(s, 150, seed=0) for s in world.SPLITS}
    scenes = {s: {world.describe(c["source"]) for c in cs} for s, cs in by_split.items()}
    assert not scenes["train"] & scenes["val"] and not scenes["train"] & scenes["test"]
    assert not scenes["val"] & scenes["test"]
    assert all(c["split"] == s for s, cs in by_split.items() for c in cs)
    again = world.sample_contexts("val", 5, seed=0)
    assert [c["instruction"] for c in again] == [c["instruction"] for c in by_split["val"][:5]]
    rng = np.random.default_rng(0)
    shares = [world.split_of(world.sample_scene(rng)) for _ in range(3000)]
    assert abs(shares.count("train") / 3000 - 0.8) < 0.03


# =========================================================================================
# Simulated actors
# =========================================================================================
@pytest.fixture(scope="module")
def edits():
    """120 val contexts x 3 editors: (editor, context, edited image, ground truth, noisy)."""
    rng, out = np.random.default_rng(7), []
    for ctx in world.sample_contexts("val", 120, seed=2):
        for name in sim.EDITORS:
            img = sim.edit(name, ctx["source_image"], ctx["instruction"], rng)
            gt = world.ground_truth(ctx["source_image"], ctx["instruction"], ctx["principles"], img)
            out.append((name, ctx, img, gt, world.is_noisy(img)))
    return out


def test_editors_have_distinct_profiles_and_independent_noise(edits):
    rates = {}
    for name in sim.EDITORS:
        rows = [(min(g for g, p in zip(gt, c["principles"]) if p["category"] == "follow"),
                 min(g for g, p in zip(gt, c["principles"]) if p["category"] == "keep"), noisy)
                for n, c, _, gt, noisy in edits if n == name]
        rates[name] = np.mean(rows, axis=0)  # (follow pass, keep pass, noisy)
        assert abs(rates[name][2] - sim.NOISE_PROB) < 0.12
    # faithful: follows and keeps; sloppy: breaks Keep; lazy: misses Follow, keeps
    assert rates["faithful"][0] > 0.7 and rates["faithful"][1] > 0.85
    assert rates["sloppy"][1] < 0.6 and 0.5 < rates["sloppy"][0] < 0.8
    assert rates["lazy"][0] < 0.55 and rates["lazy"][1] > 0.85
    follow = [min(g for g, p in zip(gt, c["principles"]) if p["category"] == "follow")
              for _, c, _, gt, _ in edits]
    noisy = [n for *_, n in edits]
    assert abs(np.corrcoef(follow, noisy)[0, 1]) < 0.15  # noise says nothing about success


def test_editors_make_shape_only_errors(edits):
    """A judge trained on the candidates must look at shapes: some failed Follow and Keep
    principles are failed by the shape alone (the right colour at the right place). Without
    them the SFT-RRM never learnt to check shapes, and Flow-GRPO's editor let kept shapes drift."""
    why = {"follow": [], "keep": []}
    for _, ctx, img, gt, _ in edits:
        seen = perceive(img)
        for g, p in zip(gt, ctx["principles"]):
            kind, f = world.parse_question(p["question"])
            if g or p["category"] not in why or "shape" not in f:
                continue
            o = world.object_at(seen, world.cell_from_name(f["pos"], world.DEFAULT.grid))
            why[p["category"]].append("shape only" if o is not None and o.color == f["color"] else "other")
    for cat, reasons in why.items():
        share = reasons.count("shape only") / len(reasons)
        assert len(reasons) > 40 and 0.1 < share < 0.6, (cat, len(reasons), share)


def test_pool_members_show_their_documented_biases(edits):
    rng = np.random.default_rng(3)
    pairs = {(m, cat): [] for m in sim.MEMBERS for cat in ("follow", "keep", "quality")}
    for name, ctx, img, gt, _ in edits:
        if name == "faithful":
            continue
        ps = ctx["principles"]
        for member in sim.MEMBERS:
            out = sim.verifier(member, verify_messages(ctx["instruction"], ps, "compact"),
                               [ctx["source_image"], img], 0.0, rng)
            parsed = parse_rrm_output(out, len(ps))
            assert parsed["status"] == "ok" and parsed["flags"] == [], out
            assert out.startswith("<think>q1 ") and ": want " in out and ", see " in out
            # the verdict in the reasoning is the point: "q<i> <place>: want X, see Y, yes|no|unsure, no."
            said = re.findall(r"q(\d+) [^:]+: want [^,]+, see (?:[^,]+(?:, [a-z ]+ (?:added|removed))*), "
                              r"(yes|no|unsure, no)\.", out)
            assert [int(i) for i, _ in said] == list(range(1, len(ps) + 1)), out
            assert [int(v == "yes") for _, v in said] == parsed["points"], out
            for pt, g, p in zip(parsed["points"], gt, ps):
                pairs[(member, p["category"])].append((pt, g))
    prof = sim.MEMBERS
    for member in prof:  # measured false-"yes" rates vs documented (+ a little misperception)
        keep, n_keep = _fail_rate(pairs[(member, "keep")])
        fol, n_fol = _fail_rate(pairs[(member, "follow")])
        qual, n_q = _fail_rate(pairs[(member, "quality")])
        assert min(n_keep, n_fol, n_q) > 60
        assert abs(keep - prof[member]["keep_miss"]) < 0.12, (member, keep)
        assert abs(fol - prof[member]["wishful"]) < 0.13, (member, fol)
        assert abs(qual - prof[member]["noise_blind"]) < 0.12, (member, qual)


def test_strict_prompt_and_temperature():
    ctx = world.sample_contexts("val", 1, seed=5)[0]
    ps, rng = ctx["principles"], np.random.default_rng(0)
    imgs = [ctx["source_image"], ctx["target_image"]]  # a perfect edit: every answer is yes

    def yes_rate(variant, temp):
        pts = [parse_rrm_output(sim.verifier("lenient", verify_messages(ctx["instruction"], ps, variant),
                                             imgs, temp, rng))["points"] for _ in range(120)]
        fk = [v for p in pts for v, pr in zip(p, ps) if pr["category"] != "quality"]
        return np.mean(fk)
    assert abs(yes_rate("strict", 0.0) - (1 - sim.STRICT_DOUBT)) < 0.06
    cold, hot = yes_rate("compact", 0.0), yes_rate("compact", 1.0)
    assert cold > 0.97 and 0.8 < hot < cold - 0.03  # temperature adds misperception


def test_change_line_states_what_the_member_saw_change(monkeypatch):
    """sim.CHANGE_LINE (MINIWORLD_CHANGE_LINE=1): a trajectory opens with what the member
    saw change, in the RRM base's pretraining words; a no-op it sees as one reads
    "changed: nothing." and scores 0; without the switch the old wording is unchanged."""
    ctx = world.sample_contexts("val", 1, seed=5)[0]
    msgs, rng = verify_messages(ctx["instruction"], ctx["principles"], "compact"), np.random.default_rng(0)
    src, tgt = ctx["source_image"], ctx["target_image"]
    say = lambda images: sim.verifier("lenient", msgs, images, 0.0, rng)  # noqa: E731
    monkeypatch.setattr(sim, "CHANGE_LINE", True)
    noop, done = say([src, src]), say([src, tgt])
    want = world.describe_change(perceive(src), perceive(tgt))
    assert noop.startswith("<think>changed: nothing. q1 ") and parse_rrm_output(noop)["score"] == 0
    assert sim.says_noop(noop) and not sim.says_noop(done)
    line = done.split(". q1 ")[0]  # the member's view may add a misperceived change (temperature 0: p .01 an object)
    assert want != "nothing" and line.startswith("<think>changed: ") and want in line
    assert parse_rrm_output(done)["score"] == 10
    monkeypatch.setattr(sim, "CHANGE_LINE", False)
    old = say([src, src])
    assert old.startswith("<think>q1 ") and " nothing changed.</think>" in old and sim.says_noop(old)


def test_inspector_accuracy_and_format(edits):
    rng, right, total = np.random.default_rng(4), 0, 0
    for _, ctx, img, gt, _ in edits:
        ps = ctx["principles"]
        msgs = inspector_messages(ctx["instruction"], ps, ["<score>5</score>"])
        out = parse_inspector(sim.inspector(msgs, [ctx["source_image"], img], rng), len(ps))
        assert out["status"] == "ok" and all(out["reasons"])
        right += sum(a == b for a, b in zip(out["gold"], gt))
        total += len(gt)
    assert abs(right / total - (1 - sim.INSPECTOR_FLIP)) < 0.015


def test_verified_scores_still_underpenalise_keep():
    """(c) of the design: with every point right, a pool member's final score charges an
    unrequested change less than the true utility does, which GCPO can later fix."""
    ins = "make the red circle yellow"
    ps = world.principles_for(SRC, ins)
    over_edit = [1, 1, 1, 0, 1, 1]  # correct recolour + background changed
    assert world.utility_from_verdicts(over_edit, ps, noop=False) == 5
    assert sim.member_score("lenient", over_edit, ps, noop=False) == 8.5
    assert sim.member_score("eager", over_edit, ps, noop=False) == 10


def test_judges_rater_and_dispatch():
    ctx = world.sample_contexts("test", 1, seed=0)[0]
    src, tgt, ins, ps = ctx["source_image"], ctx["target_image"], ctx["instruction"], ctx["principles"]
    rng = np.random.default_rng(0)
    assert parse_judge(sim.simulate_chat("judge", None, judge_sc_messages(ins), [src, tgt]))["scores"] == [10, 10]
    assert parse_judge(sim.judge(judge_sc_messages(ins), [src, src]))["scores"][0] == 0
    assert parse_judge(sim.judge(judge_pq_messages(), [tgt]))["scores"] == [10, 10]
    assert parse_rrm_output(sim.judge(scalar_messages(ins), [src, tgt], rng))["status"] == "ok"
    assert sim.prefer(src, ins, ps, tgt, src, rng) == "a"
    assert sim.prefer(src, ins, ps, src, tgt, rng) == "b"
    assert sim.prefer(src, ins, ps, tgt, tgt, rng) == "same"
    assert sim.prefer(src, ins, ps, tgt, src, rng, noise=1.0) == "b"
    gold = sim.simulate_chat("inspector", None, inspector_messages(ins, ps, []), [src, tgt], rng=rng)
    assert parse_inspector(gold, len(ps))["status"] == "ok"
    with pytest.raises(ValueError):
        sim.simulate_chat("painter", None, [], [])
    # the common.make_backend("mini:<name>") shape: n texts per (messages, images) request
    chat = sim.make_chat("eager", seed=1)
    outs = chat([(verify_messages(ins, ps, "strict"), [src, tgt])] * 2, n=3, temperature=1.0)
    assert [len(o) for o in outs] == [3, 3]
    assert all(parse_rrm_output(t, len(ps))["status"] == "ok" for o in outs for t in o)
    assert parse_principles(sim.make_chat("decomposer")([(decompose_messages(ins), [src])])[0][0])[
        "principles"] == ps


def test_text_corpus_and_grid(tmp_path):
    texts = sim.text_corpus(n_contexts=3)
    assert VERIFY_SYSTEMS["compact"] in texts
    assert any(t.startswith("<think>q1 ") and ": want " in t for t in texts)
    assert any(json.loads(t)[0]["category"] == "Instruction Following" for t in texts if t.startswith("[{"))
    sim.save_grid(tmp_path / "grid.png", n_rows=1)
    assert Image.open(tmp_path / "grid.png").size[0] > 5 * CFG.size


def test_blind_spot_reasons_of_hand_made_failures():
    """scripts/judge_blind_spots.py sorts failed principles by why they fail (README, #7)."""
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location("jbs", os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "scripts", "judge_blind_spots.py"))
    jbs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jbs)
    ins = "make the red circle yellow"
    ps = world.principles_for(SRC, ins)
    cases = {  # edited scene: the reason of each failed principle, in order (by hand)
        "the kept square drawn as a circle": (_with(SRC, put=[Obj("circle", "yellow", (0, 0)),
                                                              Obj("circle", "blue", (1, 1))]), ["shape"]),
        "recoloured to the wrong colour, the triangle recoloured too": (
            _with(SRC, put=[Obj("circle", "purple", (0, 0)), Obj("triangle", "red", (2, 2))]), ["colour", "colour"]),
        "the circle made a yellow square": (_with(SRC, put=[Obj("square", "yellow", (0, 0))]), ["shape"]),
        "the target and the triangle removed": (_with(SRC, drop=[(0, 0), (2, 2)]), ["missing", "missing", "no_others"]),
        "the square made a red triangle": (_with(SRC, put=[Obj("circle", "yellow", (0, 0)),
                                                           Obj("triangle", "red", (1, 1))]), ["colour+shape"]),
    }
    for name, (scene, want) in cases.items():
        gt = world.ground_truth(render(SRC), ins, ps, render(scene))
        got = [jbs.failure_reason(*world.parse_question(p["question"]), perceive(render(scene)))
               for g, p in zip(gt, ps) if not g]
        assert got == want, name
    # a passed principle is set apart when only an ambiguous drawing passes it (session 9)
    src = make_scene("grey", [Obj("triangle", "red", (0, 0)), Obj("circle", "green", (1, 1))])
    q = "Is the green circle at center unchanged?"
    assert jbs.ambiguous(q, perceive(_draw_superellipse(3)))
    assert not jbs.ambiguous(q, perceive(_draw_superellipse(2))) and not jbs.ambiguous(q, perceive(render(src)))
    ps_rm = world.principles_for(SRC, "remove the blue square")
    gt = world.ground_truth(render(SRC), "remove the blue square", ps_rm, render(SRC))  # a no-op
    assert [jbs.failure_reason(*world.parse_question(p["question"]), SRC) for g, p in zip(gt, ps_rm) if not g] \
        == ["still_there"]


def _load_script(name: str):
    """A scripts/ file as a module (scripts/ also on sys.path for its own imports)."""
    import importlib.util
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "scripts"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_target_verdicts_sorts_the_targets_points(tmp_path):
    """scripts/target_verdicts.py: a target right about a reshaped kept square and one wrong
    about it, hand-made; a target with too few points is counted apart."""
    import common as C
    tv = _load_script("target_verdicts")
    ins = "make the red circle yellow"
    ps = world.principles_for(SRC, ins)
    edited = _with(SRC, put=[Obj("circle", "yellow", (0, 0)), Obj("circle", "blue", (1, 1))])  # square -> circle
    render(SRC).save(tmp_path / "s.png")
    render(edited).save(tmp_path / "e.png")
    right = [int(g) for g in world.ground_truth(render(SRC), ins, ps, render(edited))]
    assert right.count(0) == 1
    rows = [{"id": f"r{i}", "source": str(tmp_path / "s.png"), "edited": str(tmp_path / "e.png"), "instruction": ins,
             "principles": ps, "target": C.format_rrm_output("", pts, 5.0)}
            for i, pts in enumerate([right, [1] * len(ps), [1]])]
    t = tv.table(rows)
    assert t["keep shape"] == (2, 0.5) and t["unaligned"] == 1
    n_keep = sum(p["category"] == "keep" for p in ps)
    assert t["follow pass"] == (2, 1.0) and t["keep pass"] == (2 * (n_keep - 1), 1.0)
    # a judge's points counted instead of the targets' (the train-fit check); None = unaligned
    j = tv.table(rows, [[1] * len(ps), right, None])
    assert j["keep shape"] == (2, 0.5) and j["unaligned"] == 1
    assert [tv.fails_keep(r) for r in rows] == [True] * 3


def test_group_agreement_prices_recover_the_worlds_costs():
    """scripts/judge_group_agreement.py: hand-made failures are counted by kind, and the
    within-group fit of the true utility on those counts gives the world's prices back
    (Follow 4, Keep 5, Quality 2; a kind that never varies inside a group: NaN)."""
    jga = _load_script("judge_group_agreement")
    ins = "make the red circle yellow"
    ps = world.principles_for(SRC, ins)
    edits = {  # edited scene: its failure counts by jga.KINDS, by hand
        "right": (_with(SRC, put=[Obj("circle", "yellow", (0, 0))]), [0, 0, 0, 0, 0, 0, 0, 0]),
        "kept square drawn as a circle": (_with(SRC, put=[Obj("circle", "yellow", (0, 0)), Obj("circle", "blue", (1, 1))]),
                                          [0, 0, 0, 1, 0, 0, 0, 0]),
        "the triangle removed too": (_with(SRC, put=[Obj("circle", "yellow", (0, 0))], drop=[(2, 2)]),
                                     [0, 0, 1, 0, 1, 0, 0, 0]),
        "no-op": (SRC, [1, 0, 0, 0, 0, 0, 0, 1]),
    }
    for name, (scene, want) in edits.items():
        gt = world.ground_truth(render(SRC), ins, ps, render(scene))
        assert jga.failure_kinds({"principles": ps}, gt, perceive(render(scene)), scene == SRC) == want, name
    # a fit on synthetic groups: reward = 10 - 4 F - 5 K - 2 Q (every Keep kind alike), a
    # judge that charges reshapes nothing; the fit reads those prices back
    rng = np.random.default_rng(0)
    feats = rng.integers(0, 2, size=(30, 8, len(jga.KINDS))).astype(float)
    feats[..., -1] = 0
    cost = np.array([4, 5, 5, 5, 5, 5, 2, 0.0])
    truth = 10 - feats @ cost
    blind = 10 - feats @ np.where(np.arange(len(cost)) == 3, 0.0, cost)
    np.testing.assert_allclose(jga.implied_prices(truth, feats)[:-1], -cost[:-1], atol=1e-9)
    assert np.isnan(jga.implied_prices(truth, feats)[-1])  # never varies inside a group
    assert abs(jga.implied_prices(blind, feats)[3]) < 1e-9


def test_onpolicy_pairs_are_disjoint_beyond_the_margin_and_capped():
    """scripts/onpolicy_pairs.pick_pairs: every pair's winner beats its loser by >= margin, no
    edit is in two pairs, at most max_pairs, and a context whose edits all tie gives none."""
    import random
    op = _load_script("onpolicy_pairs")
    u = [8.0, 7.8, 3.0, 5.0, 5.2, 0.0]
    for seed in range(20):
        got = op.pick_pairs(u, 0.5, 3, random.Random(seed))
        assert 1 <= len(got) <= 3
        assert all(u[w] - u[l] >= 0.5 for w, l in got)
        flat = [i for p in got for i in p]
        assert len(flat) == len(set(flat))
    assert len(op.pick_pairs(u, 0.5, 1, random.Random(0))) == 1
    assert op.pick_pairs([6.0, 6.2, 5.9], 0.5, 2, random.Random(0)) == []
    # the three edits of 8.0 / 7.8 / 0.0 admit only one disjoint pair with the margin
    assert len(op.pick_pairs([8.0, 7.8, 0.0], 0.5, 3, random.Random(0))) == 1


def test_mix_keep_failures_finds_the_kinds_of_hand_made_keep_failures():
    """scripts/mix_keep_failures.keep_failures names the kinds of an edit's true Keep failures
    (judge_group_agreement.failure_kinds), and none for a right edit."""
    mk = _load_script("mix_keep_failures")
    ins = "make the red circle yellow"
    row = {"instruction": ins, "principles": world.principles_for(SRC, ins)}
    right = _with(SRC, put=[Obj("circle", "yellow", (0, 0))])
    reshaped = _with(SRC, put=[Obj("circle", "yellow", (0, 0)), Obj("circle", "blue", (1, 1))])
    removed = _with(SRC, drop=[(0, 0), (2, 2)])
    assert mk.keep_failures(row, render(SRC), render(right)) == set()
    assert mk.keep_failures(row, render(SRC), render(reshaped)) == {"shape"}
    assert mk.keep_failures(row, render(SRC), render(removed)) == {"missing", "no_others"}
