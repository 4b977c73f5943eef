"""scripts/judge_blind_spots.py -- which of the world's true failures does an RRM miss? (issue #7)

For held-out `val` contexts of a mini run, takes edits from one or more sources, asks the RRM
for its verdicts (greedy, common.rrm_score) and sorts every principle the ground truth fails
by *why* it fails, from world.perceive of the edit at the place the principle names:
  colour        an object there, the wanted shape, another colour
  shape         an object there, the wanted colour, another shape
  colour+shape  an object there, both wrong
  missing       no object where one is wanted
  still_there   an object where none is wanted (removal, motion)
  no_others / bg_now / bg_kept / clean   the principles without a place
and the passed ones into "pass" and "pass, ambiguous shape" (the drawing fits another shape
a little better and the asked one within world.SHAPE_TOL; before session 9 these counted as
shape failures: circles drawn with squarish sides).
Printed per source: the true utility; per (category, reason) the count and how often the
RRM says "yes" anyway; and, grouped by the RRM's own verdicts ("1 follow, 1 keep" failed), the
mean score it wrote beside the edits' true utility -- how its score charges each failure
(session 9: the GCPO-RRM writes 8.2 for one failed Keep, the edits' true utility is 3.4).
Edits whose answer has no verdict list of the right length are counted apart and left out.
A reason the RRM passes ~always is a blind spot an editor trained on this RRM can drift into
unseen (session 7: every shape-only failure, README flow_grpo.py).

    python scripts/judge_blind_spots.py RUN RRM SOURCE [SOURCE ...]
      SOURCE: candidates      the world editors' candidates of those contexts (data/candidates.jsonl)
              base            the policy's own ODE edits (POLICY, default the committed Kontext)
              <folder>        the same with a Flow-GRPO LoRA loaded (e.g. RUN/flow_grpo_gcpo)
      env: N_CONTEXTS (60), SEEDS (2 edits per context), POLICY, STEPS (10)
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
from miniworld import world as W  # noqa: E402


def failure_reason(kind: str, f: dict, edited) -> str:
    """Why a failed principle fails, from the perceived edit (see the docstring)."""
    if "pos" not in f:
        return kind
    o = W.object_at(edited, W.cell_from_name(f["pos"], W.DEFAULT.grid))
    if kind == "empty":
        return "still_there"
    if o is None:
        return "missing"
    return {(False, True): "colour", (True, False): "shape"}.get(
        (o.color == f.get("color"), o.shape == f.get("shape")), "colour+shape")


def ambiguous(question: str, edited) -> bool:
    """A principle that passes only because the drawing is ambiguous: the object there fits
    another shape best and the asked one within world.SHAPE_TOL (Obj.also; session 9)."""
    kind, f = W.parse_question(question)
    o = W.object_at(edited, W.cell_from_name(f["pos"], W.DEFAULT.grid)) if "pos" in f and "shape" in f else None
    return o is not None and o.shape != f["shape"] and f["shape"] in o.also


def verdict_pattern(principles: list, points: list, noop: bool) -> str:
    """'all pass', '1 follow', '1 follow, 2 keep', ... from the RRM's 0/1 points, plus
    ' (no-op)' when the edit changed nothing (the human's 0, whatever the verdicts)."""
    fails = {}
    for p, v in zip(principles, points):
        if v == 0:
            fails[p["category"]] = fails.get(p["category"], 0) + 1
    key = ", ".join(f"{n} {c}" for c, n in sorted(fails.items())) or "all pass"
    return key + (" (no-op)" if noop else "")


def edits_of(source: str, run: str, rows: list, srcs: list, seeds: int, steps: int) -> list:
    """(context row, source image, edited image) triples from one SOURCE."""
    if source == "candidates":
        at = {r["id"]: i for i, r in enumerate(rows)}
        return [(rows[at[c["context_id"]]], srcs[at[c["context_id"]]], C.load_image(c["image"], c["id"]))
                for c in C.read_jsonl(os.path.join(run, "data", "candidates.jsonl")) if c["context_id"] in at]
    pipe = C.load_edit_pipeline(os.environ.get("POLICY", "miniworld/checkpoints/kontext"))
    pipe.set_progress_bar_config(disable=True)
    if source != "base":
        pipe.load_lora_weights(source)
    out = []
    for s in range(0, len(rows), 20):
        for k in range(seeds):
            ims = C.pipeline_edit(pipe, srcs[s:s + 20], [r["instruction"] for r in rows[s:s + 20]],
                                  seed=[1000 * k + i for i in range(s, s + len(srcs[s:s + 20]))],
                                  steps=steps, max_sequence_length=24)
            out += [(rows[s + i], srcs[s + i], im) for i, im in enumerate(ims)]
    return out


def main(run: str, rrm: str, sources: list) -> dict:
    torch.manual_seed(0)
    n, seeds, steps = int(os.environ.get("N_CONTEXTS", 60)), int(os.environ.get("SEEDS", 2)), int(os.environ.get("STEPS", 10))
    rows = [r for r in C.read_jsonl(os.path.join(run, "data", "contexts.jsonl"))
            if r["split"] == "val" and r["principles"]][:n]
    srcs = [C.load_image(r["source"], r["id"]) for r in rows]
    model, processor = C.load_rrm(rrm)
    model.eval()
    report = {}
    for source in sources:
        items = edits_of(source, run, rows, srcs, seeds, steps)
        outs = C.rrm_score(model, processor, [(s, e, r["instruction"]) for r, s, e in items],
                           [r["principles"] for r, _, _ in items], n=1)
        table, utility, unparsed, by_verdicts = {}, [], 0, {}
        for (r, src, ed), o in zip(items, outs):
            ps, pts = r["principles"], o[0].get("points")
            utility.append(W.utility(src, r["instruction"], ps, ed))
            if pts is None or len(pts) != len(ps):  # no verdict list to align with the principles
                unparsed += 1
                continue
            gt = W.ground_truth(src, r["instruction"], ps, ed)
            seen = W.perceive(ed)
            if o[0].get("score") is not None:  # the score the RRM wrote, by its own verdicts
                by_verdicts.setdefault(verdict_pattern(ps, pts, seen == W.perceive(src)), []).append(
                    (o[0]["score"], utility[-1]))
            for g, p, v in zip(gt, ps, pts):
                why = ("pass" if not ambiguous(p["question"], seen) else "pass, ambiguous shape") if g else \
                    failure_reason(*W.parse_question(p["question"]), seen)
                cell = table.setdefault(f"{p['category']} {why}", [0, 0])
                cell[0] += 1
                cell[1] += int(v == 1)
        report[source] = {"edits": len(items), "unparsed": unparsed, "utility": float(np.mean(utility)),
                          "rrm_yes": {k: (v[0], v[1] / v[0]) for k, v in sorted(table.items())},
                          "score_by_verdicts": {k: (len(v), float(np.mean([a for a, _ in v])), float(np.mean([b for _, b in v])))
                                                for k, v in sorted(by_verdicts.items(), key=lambda kv: -len(kv[1]))}}
        print(f"== {source}: {len(items)} edits ({unparsed} without one verdict per principle, left out), "
              f"true utility {np.mean(utility):.2f}")
        for k, (cnt, rate) in report[source]["rrm_yes"].items():
            print(f"   {k:24s} n={cnt:4d}  RRM says yes {rate:.2f}")
        print("   the RRM's own verdicts -> the score it wrote, beside the true utility of those edits:")
        for k, (cnt, score, util) in report[source]["score_by_verdicts"].items():
            print(f"   {k:36s} n={cnt:4d}  RRM score {score:5.2f}  true utility {util:5.2f}")
    return report


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
