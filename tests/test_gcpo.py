"""gcpo.py: advantages by hand, the first PPO ratio is exactly 1 whatever the batch layout,
an update raises the log-probability of positive-advantage trajectories, bad inputs give
clear errors; (slow) 1 process == 2 processes and resume == an unbroken run."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import common as C
import gcpo
from stage_fixtures import run_script


@pytest.fixture(scope="module")
def rollouts(tiny_run):
    torch.manual_seed(0)
    model, processor = C.load_rrm(tiny_run["base"])
    pairs = C.read_jsonl(os.path.join(tiny_run["run"], "data", "pairs_train.jsonl"))[:2]
    reqs, prins = C.pair_requests(pairs)
    msgs = [C.verify_messages(i, p, "compact") for (_, _, i), p in zip(reqs, prins)]
    prompts = C.encode_prompts(processor, msgs, [[s, e] for s, e, _ in reqs])   # 4 prompts
    gen = C.generate_shared(model, processor, prompts, n=3, temperature=1.0, max_new_tokens=24)
    return model, processor, prompts, gen


def test_pair_advantages_by_hand():
    # pair 1 (N=3): winner [8, 5, 3] vs loser [6, 5, 2]  -> worked in tests/test_common.py
    # pair 2: winner [9, 9, 9] vs loser [1, 2, 3] -> every ratio 1 -> no signal
    adv, rew, live = gcpo.pair_advantages([[8, 5, 3], [6, 5, 2], [9, 9, 9], [1, 2, 3]], 3, "worst")
    np.testing.assert_allclose(adv[:6].numpy(), [4 / 9, -2 / 9, -2 / 9, -2 / 9, -2 / 9, 4 / 9], atol=1e-6)
    assert adv[6:].abs().sum() == 0 and live == [True, False]
    np.testing.assert_allclose(rew[6:], 1.0)
    for g in range(4):  # every group of N sums to zero
        assert abs(float(adv[3 * g:3 * g + 3].sum())) < 1e-6


def test_first_ratio_is_one_whatever_the_layout(rollouts):
    model, processor, prompts, gen = rollouts
    ids, mask, old = gen["completion_ids"], gen["completion_mask"], gen["old_logp"]   # 12 rows
    model.train()
    # the update's layout differs from sampling: shuffled rows, micro-batches of 5, shared prefix
    order = [7, 2, 11, 0, 5, 9, 1, 4, 10, 3, 8, 6]
    with torch.no_grad():
        for s in range(0, 12, 5):
            rb = order[s:s + 5]
            uniq = sorted({r // 3 for r in rb})
            lp = C.completion_logprobs_shared(model, C.select_rows(prompts, uniq), [uniq.index(r // 3) for r in rb],
                                              ids[rb], mask[rb])
            ratio = torch.exp(lp - old[rb]) * mask[rb] + (1 - mask[rb])
            assert float((ratio - 1).abs().max()) < 1e-5
        # and without prefix sharing (HF layout)
        lp = C.completion_logprobs(model, C.select_rows(C.repeat_prompts(prompts, 3), order), ids[order], mask[order])
        assert float(((torch.exp(lp - old[order]) - 1) * mask[order]).abs().max()) < 1e-5
    # prefix-shared greedy generation is HF's greedy generation
    a = C.generate_shared(model, processor, prompts, n=1, temperature=0.0, max_new_tokens=10)
    b = C.generate_n(model, processor, prompts, n=1, temperature=0.0, max_new_tokens=10)
    assert torch.equal(a["completion_ids"], b["completion_ids"])


def test_update_raises_logprob_of_positive_advantage(rollouts):
    model, processor, prompts, gen = rollouts
    model = type(model).from_pretrained(model.name_or_path)  # a fresh copy: leave the fixture intact
    ids, mask, old = gen["completion_ids"], gen["completion_mask"], gen["old_logp"]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 0.0] * 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = [r // 3 for r in range(12)]
    model.train()
    for _ in range(3):
        lp = C.completion_logprobs_shared(model, prompts, idx, ids, mask)
        loss, stats = C.ppo_clip_loss(lp, old, adv, mask, clip_eps=10.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        new = C.completion_logprobs_shared(model, prompts, idx, ids, mask)
    per_seq = ((new - old) * mask).sum(1) / mask.sum(1)
    assert float(per_seq[adv > 0].min()) > 0, per_seq
    assert float(per_seq[adv < 0].max()) < 0, per_seq


def test_bad_inputs_give_clear_errors(tiny_run, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = C.read_jsonl(os.path.join(tiny_run["run"], "data", "pairs_train.jsonl"))
    (data / "pairs_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    args = gcpo.Args(model=tiny_run["base"], run_dir=str(tmp_path), report_to="none", pairs_per_step=1,
                     per_device_pairs=1, steps=1, n=2, max_new_tokens=4)

    def write(rs):
        (data / "pairs_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    write([{k: v for k, v in rows[0].items() if k != "loser"}])
    with pytest.raises(C.DataError, match=r"pairs_train.jsonl line 1: missing field\(s\) \['loser'\]"):
        gcpo.main(args)
    write([dict(rows[0], principles=[])])
    with pytest.raises(C.DataError, match="empty principles"):
        gcpo.main(args)
    write([dict(rows[0], winner=str(tmp_path / "gone.png"))])
    with pytest.raises(C.DataError, match="image not found: .*gone.png"):
        gcpo.main(args)
