"""scripts/gcpo_exploration.py -- can GCPO change the score an SFT-RRM writes? (issue #6)

GCPO only learns from what the policy samples. In the mini world the SFT-RRM's errors are
mostly in its final <score> (its per-principle points are ~96% right), so the question is
whether its samples ever write a score other than the rule it was taught. Prints:
  1. for each SFT set, how often the target's <score> equals 10 x mean(its points), rounded
     to 0.5 (the lenient / blind members' rule); is 0 for an edit the member saw change
     nothing (every member scores a no-op 0); or is another rule (the eager member's
     Follow-only one);
  2. for the first PAIRS training pairs, N samples per image at each temperature: parse rate,
     prompts whose samples give more than one score / more than one points list, and
     samples whose score differs from the mean of their own points.

    python scripts/gcpo_exploration.py [RUN_DIR] [MODEL] [N] [PAIRS]   # default runs/mini runs/mini/sft_rrm 8 24
"""
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402

run, model_dir, n, n_pairs = (sys.argv[1:] + ["runs/mini", "", "8", "24"][len(sys.argv) - 1:])[:4]
model_dir, n, n_pairs = model_dir or os.path.join(run, "sft_rrm"), int(n), int(n_pairs)


def mean_rule(points: list[int]) -> float:
    return round(10 * sum(points) / len(points) * 2) / 2


def bucket(text: str, n_principles: int) -> str:
    """Which score rule a trajectory follows (the mini pool ends a no-op's reasoning with
    "nothing changed.")."""
    parsed = C.parse_rrm_output(text, n_principles)
    if parsed["status"] != "ok" or not parsed["points"]:
        return "unparsed"
    if parsed["score"] == mean_rule(parsed["points"]):
        return "score = mean rule"
    return "no-op, score 0" if parsed["score"] == 0 and "nothing changed" in text else "other rule"


# 1. the SFT targets
for name in ("think_verify", "think_only"):
    count = collections.Counter()
    for r in C.read_jsonl(os.path.join(run, "data", f"sft_{name}.jsonl")):
        count[bucket(r["target"], len(r["principles"]))] += 1
    print(f"SFT set {name}: {dict(count)}")

# 2. the model's own samples (common.generate_shared: what gcpo.py samples with)
torch.manual_seed(0)
model, processor = C.load_rrm(model_dir)
model.eval()
reqs, prins = C.pair_requests(C.read_jsonl(os.path.join(run, "data", "pairs_train.jsonl"))[:n_pairs])
msgs = [C.verify_messages(ins, p, "compact") for (_, _, ins), p in zip(reqs, prins)]
for temperature in (0.7, 1.0):
    c = collections.Counter()
    for s in range(0, len(reqs), 16):
        prompts = C.encode_prompts(processor, msgs[s:s + 16], [[a, b] for a, b, _ in reqs[s:s + 16]])
        with torch.no_grad():
            gen = C.generate_shared(model, processor, prompts, n=n, temperature=temperature, max_new_tokens=256)
        for texts, p in zip(gen["texts"], prins[s:s + 16]):
            ok = [x for x in (C.parse_rrm_output(t, len(p)) for t in texts) if x["status"] == "ok" and x["points"]]
            c["prompts"] += 1
            c["samples"] += len(texts)
            c["parsed"] += len(ok)
            c["prompts with >1 score"] += len({x["score"] for x in ok}) > 1
            c["prompts with >1 points list"] += len({tuple(x["points"]) for x in ok}) > 1
            c["samples with score != mean rule"] += sum(x["score"] != mean_rule(x["points"]) for x in ok)
    print(f"temperature {temperature}, N={n}: {dict(c)}")
