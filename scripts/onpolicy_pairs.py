"""scripts/onpolicy_pairs.py -- preference pairs between the editor's *own* edits, for gcpo.py (#7).

build_data.py's pairs compare edits of different editors of one context (the world's
candidate editors), often far apart. Flow-GRPO needs a judge that orders the policy's similar
edits of one context (scripts/judge_group_agreement.py). This script makes human-style pairs
of exactly those: K edits per train context from a diffusers editor (ODE, each from its own
starting noise; optionally with a Flow-GRPO LoRA, to sample where a trained policy went),
labelled by the mini world's true utility, the simulated human:

  1. edit       K edits per context, seed 777000 + 1000 k + i (context i, draw k)
  2. label      u = world.utility(source, instruction, principles, edit)
  3. pair       ordered pairs (w, l) with u_w - u_l >= MARGIN ("same" dropped, as
                build_data.py's --same_margin), at most P per context (default 1), no edit in two
                pairs (pick_pairs)

It writes OUT_RUN/data/pairs_train_<TAG>.jsonl (rows as build_data.py's pairs, plus u_winner /
u_loser) and the edits under OUT_RUN/data/onpolicy_images/, and links every other file of
RUN/data into OUT_RUN/data, so `gcpo.py --run_dir OUT_RUN` trains on these pairs (concatenate
the TAG files into pairs_train.jsonl) and evaluates on RUN's val pairs.

    python scripts/onpolicy_pairs.py RUN OUT_RUN
      env: N (400 train contexts, a seeded shuffle), K (4), P (1), MARGIN (0.5), TAG (base),
           POLICY (the committed Kontext), LORA (a Flow-GRPO folder)

Session 22 (seed 0, README flow_grpo.py section): GCPO on 1,395 such pairs (N 1000, TAG base and
TAG drift with LORA=runs/c0/flow40_e2kdn) raised val pairwise accuracy 0.787 -> 0.863 and lowered within-group agreement.
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402


def pick_pairs(utilities: list[float], margin: float, max_pairs: int, rng: random.Random) -> list[tuple[int, int]]:
    """ALGO 3: (winner, loser) index pairs of one context's edits whose utilities differ by at
    least `margin`, drawn at random, at most `max_pairs`, each edit in at most one pair."""
    cand = [(i, j) for i in range(len(utilities)) for j in range(len(utilities))
            if utilities[i] - utilities[j] >= margin]
    rng.shuffle(cand)
    out, used = [], set()
    for i, j in cand:
        if len(out) == max_pairs:
            break
        if i not in used and j not in used:
            out.append((i, j))
            used |= {i, j}
    return out


def main(run: str, out_run: str) -> None:
    from miniworld import world as W
    n, K, P = int(os.environ.get("N", 400)), int(os.environ.get("K", 4)), int(os.environ.get("P", 1))
    margin, tag = float(os.environ.get("MARGIN", 0.5)), os.environ.get("TAG", "base")
    rows = [r for r in C.read_jsonl(os.path.join(run, "data", "contexts.jsonl")) if r["split"] == "train" and r["principles"]]
    rng = random.Random(0)
    rng.shuffle(rows)
    rows = rows[:n]
    srcs = [C.load_image(r["source"], r["id"]) for r in rows]
    pipe = C.load_edit_pipeline(os.environ.get("POLICY", "miniworld/checkpoints/kontext"))
    pipe.set_progress_bar_config(disable=True)
    if os.environ.get("LORA"):
        pipe.load_lora_weights(os.environ["LORA"])
    data = os.path.join(out_run, "data")
    images = os.path.join(data, "onpolicy_images")
    os.makedirs(images, exist_ok=True)
    for f in os.listdir(os.path.join(run, "data")):  # everything but the training pairs, shared with RUN
        if not f.startswith("pairs_train") and not os.path.exists(os.path.join(data, f)):
            os.symlink(os.path.abspath(os.path.join(run, "data", f)), os.path.join(data, f))

    # 1. edit: K per context, 20 contexts per pipeline call, a generator per image
    edits = [[None] * K for _ in rows]
    for k in range(K):
        for s in range(0, len(rows), 20):
            ims = C.pipeline_edit(pipe, srcs[s:s + 20], [r["instruction"] for r in rows[s:s + 20]],
                                  seed=[777000 + 1000 * k + i for i in range(s, min(s + 20, len(rows)))],
                                  steps=10, max_sequence_length=24)
            for i, im in enumerate(ims):
                edits[s + i][k] = im

    # 2-3. label by the true utility and pair
    pairs, n_same = [], 0
    for r, src, es in zip(rows, srcs, edits):
        u = [W.utility(src, r["instruction"], r["principles"], e) for e in es]
        n_same += sum(abs(u[i] - u[j]) < margin for i in range(K) for j in range(i + 1, K))
        paths = [os.path.join(images, f"{r['id']}_{tag}_k{k}.png") for k in range(K)]
        for e, p in zip(es, paths):
            C.save_image_atomic(e, p)
        for i, j in pick_pairs(u, margin, P, rng):
            pairs.append({"id": f"onp-{tag}-{len(pairs)}", "context_id": r["id"], "winner": paths[i], "loser": paths[j],
                          "source": r["source"], "instruction": r["instruction"], "principles": r["principles"],
                          "category": r["category"], "u_winner": u[i], "u_loser": u[j]})
    C.write_jsonl_atomic(os.path.join(data, f"pairs_train_{tag}.jsonl"), pairs)
    print(f"{len(rows)} contexts x {K} edits: {len(pairs)} pairs ({n_same} edit pairs closer than {margin} dropped)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
