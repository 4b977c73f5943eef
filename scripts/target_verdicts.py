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

    python scripts/target_verdicts.py RUN/data/sft_think_verify.jsonl
"""
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from judge_blind_spots import failure_reason  # noqa: E402
from miniworld import world as W  # noqa: E402


def table(rows: list) -> dict:
    """{"<category> <reason>": (count, share of targets saying yes)} over rows with a target
    that has one point per principle; rows without are counted under "unaligned"."""
    tab, unaligned = collections.defaultdict(lambda: [0, 0]), 0
    for r in rows:
        pts = C.parse_rrm_output(r["target"])["points"]
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


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    rows = [r for r in C.read_jsonl(sys.argv[1], required=("id", "source", "edited", "instruction", "principles", "target"))
            if r.get("split", "train") == "train"]
    t = table(rows)
    print(f"{len(rows)} train rows ({t.pop('unaligned')} without one point per principle, left out)")
    for k, (n, yes) in t.items():
        print(f"  {k:22s} n={n:6d} ({n / max(len(rows), 1):.3f} per row)  target says yes {yes:.2f}")
