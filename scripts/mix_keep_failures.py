"""scripts/mix_keep_failures.py -- extra copies of the SFT rows whose edit truly fails a given Keep check (#7).

Session 21's `sft_rrm_e2k`: the judge charged reshapes and `no_others` failures a third of the
truth's price, so the train rows of data/sft_think_verify.jsonl whose edit truly fails one of
those Keep checks go in again, COPIES times, as `sft_rrm.py --mix_data` rows (their own
Think+Verify target as the answer, the compact verify prompt). The kind of each failure is
judge_group_agreement.failure_kinds' (recolour, missing, shape, no_others, other).

    python scripts/mix_keep_failures.py RUN COPIES KINDS     e.g. runs/c0 2 no_others,shape
      -> RUN/data/mix_keep_<kinds>_x<COPIES>.jsonl
"""
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from judge_group_agreement import KINDS, failure_kinds  # noqa: E402
from miniworld import world as W  # noqa: E402


def keep_failures(row: dict, source, edited) -> set:
    """The kinds ('shape', 'no_others', ...) of the row's truly failed Keep principles."""
    counts = failure_kinds(row, W.ground_truth(source, row["instruction"], row["principles"], edited),
                           W.perceive(edited), False)
    return {k[len("keep "):] for k, c in zip(KINDS, counts) if k.startswith("keep ") and c}


def main(run: str, copies: int, kinds: list) -> None:
    rows = [r for r in C.read_jsonl(os.path.join(run, "data", "sft_think_verify.jsonl"))
            if r.get("split", "train") == "train"]
    out, n_kind = [], collections.Counter()
    for i, r in enumerate(rows):
        src, ed = C.load_image(r["source"], f"row {i + 1}"), C.load_image(r["edited"], f"row {i + 1}")
        hit = keep_failures(r, src, ed) & set(kinds)
        n_kind.update(hit)
        if hit:
            msgs = C.verify_messages(r["instruction"], r["principles"], "compact")
            out += [{"id": f"{r['id']}#keep{c}", "messages": msgs, "images": [r["source"], r["edited"]],
                     "answer": r["target"]} for c in range(copies)]
    path = os.path.join(run, "data", f"mix_keep_{'_'.join(kinds)}_x{copies}.jsonl")
    C.write_jsonl_atomic(path, out)
    print(f"{len(rows)} train rows; failing {dict(n_kind)}; {len(out) // max(copies, 1)} rows x {copies} -> {path}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","))
