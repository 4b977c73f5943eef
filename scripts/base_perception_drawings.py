"""scripts/base_perception_drawings.py -- does an RRM see the editor's drawings as well as the
world's renders? (#7, #3)

Flow-GRPO's judge must verify a diffusion editor's *drawings*; the RRM base was pretrained on
the world's renders only (miniworld/pretrain_rrm.py). This script edits N `test` contexts once
with the policy (ODE, 10 steps) and once with the world's simulated editors (renders), and runs
the base's own perception evaluation (pretrain_rrm.evaluate: objects described right, the
change line exactly right, grounded comparison items, yes/no questions overall and by kind:
true objects, shape-wrong and colour-wrong guesses) on both sets of (source, edit) pairs.
Any RRM folder works (an SFT-RRM answers the pretraining prompts less well: it was taught
another format).

    python scripts/base_perception_drawings.py [RRM]     (default miniworld/checkpoints/rrm_base)
      env: N (160 contexts), POLICY (the committed Kontext), STEPS (10)
Session 17 (160 contexts, 2 threads, 1 min): renders / drawings -- objects 0.944 / 0.891,
change line 0.781 / 0.650, questions 0.972 / 0.959 (true objects 0.992 / 0.890, shape-wrong
guesses 0.936 / 0.900, colour-wrong 1.000 / 1.000).
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
from miniworld import pretrain_rrm as PR, sim, world as W  # noqa: E402


def main(rrm: str = "miniworld/checkpoints/rrm_base", n: int = 160) -> dict:
    torch.manual_seed(0)
    rng = np.random.default_rng(7)
    ctxs = [W.sample_context(rng, split="test") for _ in range(n)]
    srcs = [c["source_image"] for c in ctxs]
    pipe = C.load_edit_pipeline(os.environ.get("POLICY", "miniworld/checkpoints/kontext"))
    pipe.set_progress_bar_config(disable=True)
    drawn = []
    for s in range(0, n, 20):
        drawn += C.pipeline_edit(pipe, srcs[s:s + 20], [c["instruction"] for c in ctxs[s:s + 20]],
                                 seed=list(range(s, s + len(srcs[s:s + 20]))),
                                 steps=int(os.environ.get("STEPS", 10)), max_sequence_length=24)
    del pipe
    rendered = [sim.edit(str(rng.choice(list(sim.EDITORS))), c["source_image"], c["instruction"], rng) for c in ctxs]
    model, processor = C.load_rrm(rrm)
    model.eval()
    report, sample_pair = {}, PR.sample_pair
    try:
        for name, edits in (("renders", rendered), ("drawings", drawn)):
            pairs = iter(list(zip(srcs, edits)))
            PR.sample_pair = lambda rng, split: next(pairs)   # evaluate() draws its pairs from here
            report[name] = PR.evaluate(model, processor, n, 0)
            print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in report[name].items()})
    finally:
        PR.sample_pair = sample_pair
    return report


if __name__ == "__main__":
    if len(sys.argv) > 2 or (len(sys.argv) == 2 and sys.argv[1] in ("-h", "--help")):
        sys.exit(__doc__)
    main(*(sys.argv[1:2] or ["miniworld/checkpoints/rrm_base"]), n=int(os.environ.get("N", 160)))
