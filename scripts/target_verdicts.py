"""scripts/target_verdicts.py -- how right, and how rare, is each kind of failure in the SFT targets? (#7)

For every `train` row of an SFT set (build_data.py's sft_<set>.jsonl) this compares the
target's 0/1 points with the world's ground truth of the row's edit and sorts every principle
the way judge_blind_spots.py does (a pass, or why it fails: colour, shape, missing,
still_there, no_others, ...). Printed per (category, reason): how many there are, per row,
and how often the target says "yes" (right on a pass, wrong on a failure).
A judge learns a reason's check from its share of the targets: session 17 (seed 0 of the
change-line data, `runs/c0`) found the targets right about Keep failures (yes 0.05-0.09) but
Keep failures only 1,102 of 16,530 Keep principles (6.7%; Follow: 1,875 of 5,244, 36%), and
the SFT-RRM passing 0.40-0.80 of Keep failures even on the world's own candidates.

    python scripts/target_verdicts.py RUN/data/sft_think_verify.jsonl [RRM]

With RRM (an SFT'd judge of that data, e.g. RUN/sft_rrm) it also asks the judge, greedy, for
its verdicts on N train rows (env N, default 300) whose edit truly fails a Keep principle --
rows it was trained on -- and prints beside the targets how often the judge says "yes" (in
its <points>, and in its own reasoning lines, common.reasoning_verdicts): does
the judge fit its own targets on Keep failures (then the gap is generalisation), or not even
those (then the data does not teach it)?
"""
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from judge_blind_spots import failure_reason  # noqa: E402
from miniworld import world as W  # noqa: E402


def table(rows: list, points: list | None = None) -> dict:
    """{"<category> <reason>": (count, share of targets saying yes)} over rows with a target
    that has one point per principle; rows without are counted under "unaligned".
    points: per row, other verdicts to count instead of the target's (a judge's; None = unaligned)."""
    tab, unaligned = collections.defaultdict(lambda: [0, 0]), 0
    for i, r in enumerate(rows):
        pts = C.parse_rrm_output(r["target"])["points"] if points is None else points[i]
        if pts is None or len(pts) != len(r["principles"]):
            unaligned += 1
            continue
        src, ed = C.load_image(r["source"], r["id"]), C.load_image(r["edited"], r["id"])
        seen = W.perceive(ed)
        for g, p, v in zip(W.ground_truth(src, r["instruction"], r["principles"], ed), r["principles"], pts):
            why = "pass" if g else failure_reason(*W.parse_question(p["question"]), seen)
            cell = tab[f"{p['category']} {why}"]
            cell[0] += 1
            cell[1] += int(v == 1)
    return {**{k: (n, y / n) for k, (n, y) in sorted(tab.items())}, "unaligned": unaligned}


def fails_keep(r: dict) -> bool:
    src, ed = C.load_image(r["source"], r["id"]), C.load_image(r["edited"], r["id"])
    return any(g == 0 and p["category"] == "keep"
               for g, p in zip(W.ground_truth(src, r["instruction"], r["principles"], ed), r["principles"]))


def judge_points(rrm: str, rows: list) -> tuple[list, list]:
    """The judge's greedy verdicts on each row (its own prompt wording, row["variant"]): its
    <points>, and the verdicts its reasoning lines state (common.reasoning_verdicts)."""
    model, processor = C.load_rrm(rrm)
    model.eval()
    out, said = [None] * len(rows), [None] * len(rows)
    for variant in sorted({r.get("variant", "compact") for r in rows}):
        idx = [i for i, r in enumerate(rows) if r.get("variant", "compact") == variant]
        reqs = [(C.load_image(rows[i]["source"]), C.load_image(rows[i]["edited"]), rows[i]["instruction"]) for i in idx]
        res = C.rrm_score(model, processor, reqs, [rows[i]["principles"] for i in idx], n=1, batch_size=32,
                          variant=variant)
        for i, o in zip(idx, res):
            out[i], said[i] = o[0].get("points"), o[0].get("reasoning_points")
    return out, said


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    rows = [r for r in C.read_jsonl(sys.argv[1], required=("id", "source", "edited", "instruction", "principles", "target"))
            if r.get("split", "train") == "train"]
    t = table(rows)
    print(f"{len(rows)} train rows ({t.pop('unaligned')} without one point per principle, left out)")
    for k, (n, yes) in t.items():
        print(f"  {k:22s} n={n:6d} ({n / max(len(rows), 1):.3f} per row)  target says yes {yes:.2f}")
    if len(sys.argv) == 3:
        picked = [r for r in rows if fails_keep(r)][:int(os.environ.get("N", 300))]
        pts, said = judge_points(sys.argv[2], picked)
        judged, lines, targets = table(picked, pts), table(picked, said), table(picked)
        lines.pop("unaligned")
        print(f"{sys.argv[2]} on {len(picked)} of these train rows whose edit fails a Keep principle "
              f"({judged.pop('unaligned')} answers without one point per principle, left out):")
        targets.pop("unaligned")
        for k, (n, yes) in judged.items():
            line = f"  (its reasoning lines: {lines[k][1]:.2f} of {lines[k][0]})" if k in lines else ""
            print(f"  {k:22s} n={n:6d}  target says yes {targets[k][1]:.2f}  judge says yes {yes:.2f}{line}")
