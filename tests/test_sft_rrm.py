"""sft_rrm.py: the loss is on the completion only, 1 process == 2 processes, resume replays
the same trajectory, the saved model reloads through the Auto classes and generates."""
import json
import math
import os
import shutil

import pytest
import torch

import common as C
import sft_rrm
from stage_fixtures import run_script


def test_masked_prompt_tokens_contribute_no_loss(tiny_run):
    torch.manual_seed(0)
    model, processor = C.load_rrm(tiny_run["base"])
    rows = C.read_jsonl(os.path.join(tiny_run["run"], "data", "sft_think_verify.jsonl"))[:3]
    loss, n_tok = sft_rrm.sft_loss(model, processor, rows, "compact", 4096)
    # by hand: one forward over [prompt ; target ; <|im_end|>] per row, the NLL of the
    # target tokens only, averaged per row, then over rows
    tok = processor.tokenizer
    per_row = []
    for r in rows:
        msgs = [C.verify_messages(r["instruction"], r["principles"], "compact")]
        prompt = C.encode_prompts(processor, msgs, [[C.load_image(r["source"]), C.load_image(r["edited"])]])
        target = tok(r["target"], add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        ids = torch.cat([prompt["input_ids"], torch.tensor([target])], 1)
        mm = torch.cat([prompt["mm_token_type_ids"], torch.zeros(1, len(target), dtype=torch.long)], 1)
        model.model.rope_deltas = None
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                       pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"]).logits[0]
        L = prompt["input_ids"].shape[1]
        nll = [-torch.log_softmax(logits[L - 1 + t], -1)[target[t]].item() for t in range(len(target))]
        per_row.append(sum(nll) / len(nll))
    assert abs(loss.item() - sum(per_row) / len(per_row)) < 1e-4
    assert n_tok == sum(len(tok(r["target"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    # changing the prompt text changes the loss only through conditioning, never by adding
    # terms: a prompt twice as long leaves the number of scored tokens unchanged
    longer = [dict(r, instruction=r["instruction"] + " please, carefully") for r in rows]
    assert sft_rrm.sft_loss(model, processor, longer, "compact", 4096)[1] == n_tok


def test_verdict_weight_weighs_exactly_the_verdict_tokens(tiny_run):
    """--verdict_weight: the <points> scores and the reasoning lines' yes/no get weight W,
    nothing else (not the question numbers, the average or the final score), and the loss is
    the weighted per-sequence mean of the token log-probs; W = 1 is the plain loss."""
    model, processor = C.load_rrm(tiny_run["base"])
    tok = processor.tokenizer
    text = ('<think>q1 top: want red square, see red square, yes. q2 noise: want none, see noisy, no.'
            '</think>\n<points>[{"question": 1, "score": 1}, {"question": 2, "score": 0}]</points>\n'
            '<average_score>0.50</average_score>\n<score>5</score>')
    ids, mask = C.tokenize_completions(processor, [text])
    w = sft_rrm.verdict_weights(tok, [text], ids.shape, 4.0)
    marked = [tok.decode([int(i)]).strip() for i, v in zip(ids[0], w[0]) if v == 4.0]
    assert marked == ["yes", "no", "1", "0"]
    assert float(w[0, -1]) == 1.0                      # <|im_end|> keeps weight 1
    rows = C.read_jsonl(os.path.join(tiny_run["run"], "data", "sft_think_verify.jsonl"))[:3]
    targets = [r["target"] for r in rows]
    msgs = [C.verify_messages(r["instruction"], r["principles"], "compact") for r in rows]
    images = [[C.load_image(r["source"]), C.load_image(r["edited"])] for r in rows]
    ids, mask = C.tokenize_completions(processor, targets)
    with torch.no_grad():
        logp = C.completion_logprobs(model, C.encode_prompts(processor, msgs, images), ids, mask)
        weighted, n_tok = sft_rrm.sft_loss(model, processor, rows, "compact", 4096, verdict_weight=4.0)
        plain, _ = sft_rrm.sft_loss(model, processor, rows, "compact", 4096)
    w = sft_rrm.verdict_weights(tok, targets, ids.shape, 4.0) * mask
    assert all(int((wi == 4.0).sum()) == 2 * len(r["principles"]) for wi, r in zip(w, rows))
    by_hand = -((logp * w).sum(1) / w.sum(1)).mean()
    assert abs(weighted.item() - by_hand.item()) < 1e-5
    assert abs(plain.item() + (logp.sum(1) / mask.sum(1)).mean().item()) < 1e-5
    assert abs(weighted.item() - plain.item()) > 1e-4 and n_tok == int(mask.sum())


def test_too_long_sample_is_an_error_naming_the_row(tiny_run):
    model, processor = C.load_rrm(tiny_run["base"])
    rows = C.read_jsonl(os.path.join(tiny_run["run"], "data", "sft_think_verify.jsonl"))[:1]
    with pytest.raises(C.DataError, match=rows[0]["id"].replace("|", r"\|")):
        sft_rrm.sft_loss(model, processor, rows, "compact", 16)


def test_length_grouped_batches_cover_each_row_once_and_pad_less():
    n, B, W = 100, 4, 5                                 # 25 batches an epoch, windows of 5 batches
    lengths = [(i * 37) % 101 for i in range(n)]
    for epoch in range(2):
        steps = range(epoch * 25, (epoch + 1) * 25)
        grouped = [sft_rrm.batch_indices(s, n, B, 3, lengths, W) for s in steps]
        plain = [sft_rrm.batch_indices(s, n, B, 3) for s in steps]
        assert sorted(i for b in grouped for i in b) == list(range(n))      # every row once
        for w in range(5):  # a window holds the rows of the plain permutation's window, re-cut
            assert sorted(i for b in grouped[w * W:(w + 1) * W] for i in b) == \
                sorted(i for b in plain[w * W:(w + 1) * W] for i in b)
        # each batch is a run of its window's rows sorted by length: no other row of the
        # window lies strictly between a batch's shortest and longest row
        for w in range(5):
            window = [i for b in grouped[w * W:(w + 1) * W] for i in b]
            for b in grouped[w * W:(w + 1) * W]:
                lo, hi = min(lengths[i] for i in b), max(lengths[i] for i in b)
                assert not [i for i in window if i not in b and lo < lengths[i] < hi]
        pad = lambda bs: sum(B * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in bs)
        assert pad(grouped) < pad(plain) / 2
    # a pure function of the step (resume replays it) and a different order per seed
    assert sft_rrm.batch_indices(7, n, B, 3, lengths, W) == sft_rrm.batch_indices(7, n, B, 3, lengths, W)
    assert [sft_rrm.batch_indices(s, n, B, 3, lengths, W) for s in range(5)] != \
        [sft_rrm.batch_indices(s, n, B, 4, lengths, W) for s in range(5)]


def test_row_lengths_order_rows_as_their_encoded_length(tiny_run):
    _, processor = C.load_rrm(tiny_run["base"])
    rows = C.read_jsonl(os.path.join(tiny_run["run"], "data", "sft_think_verify.jsonl"))[:24]
    prompts = C.encode_prompts(processor, [C.verify_messages(r["instruction"], r["principles"], "compact") for r in rows],
                               [[C.load_image(r["source"]), C.load_image(r["edited"])] for r in rows])
    _, mask = C.tokenize_completions(processor, [r["target"] for r in rows])
    true = (prompts["attention_mask"].sum(1) + mask.sum(1)).float()
    proxy = torch.tensor(sft_rrm.row_lengths(processor.tokenizer, rows), dtype=torch.float)
    assert true.std() > 0 and torch.corrcoef(torch.stack([true, proxy]))[0, 1] > 0.95


def _args(tiny_run, name, **kw):
    base = ["sft_rrm.py", "--model", tiny_run["base"], "--run_dir", tiny_run["run"], "--output_name", name,
            "--report_to", "none", "--eval_max_pairs", "2", "--max_new_tokens", "8", "--eval_every", "0",
            "--batch_size", "8", "--lr", "1e-3"]
    return base + [x for k, v in kw.items() for x in (f"--{k}", str(v))]


def _summary(tiny_run, name):
    return json.load(open(os.path.join(tiny_run["run"], name, "summary.json")))


@pytest.mark.slow
def test_one_vs_two_processes_and_resume(tiny_run):
    # 1 process, batch 8 on one device
    run_script(_args(tiny_run, "sft_p1", max_steps=4, per_device_batch_size=8, checkpoint_every=2))
    one = _summary(tiny_run, "sft_p1")["loss_history"]
    # 2 processes x 4 sequences: the same global batch, the same rows per step
    run_script(_args(tiny_run, "sft_p2", max_steps=4, per_device_batch_size=4), two_procs=True)
    two = _summary(tiny_run, "sft_p2")["loss_history"]
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5), (one, two)
    # gradient accumulation: 1 process, 2 micro-batches of 4 == one batch of 8
    run_script(_args(tiny_run, "sft_acc", max_steps=4, per_device_batch_size=4))
    acc = _summary(tiny_run, "sft_acc")["loss_history"]
    for a, b in zip(one, acc):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5), (one, acc)
    # resume from step 2 replays steps 3 and 4 exactly
    ck = os.path.join(tiny_run["run"], "sft_p1", "checkpoints", "checkpoint-2")
    assert os.path.isdir(ck)
    shutil.copytree(ck, os.path.join(tiny_run["run"], "sft_resume", "checkpoints", "checkpoint-2"))
    run_script(_args(tiny_run, "sft_resume", max_steps=4, per_device_batch_size=8,
                     resume_from_checkpoint="latest"))
    resumed = _summary(tiny_run, "sft_resume")["loss_history"]
    assert len(resumed) == 2
    for a, b in zip(one[2:], resumed):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (one, resumed)
    # the saved model reloads through the Auto classes and generates
    model, processor = C.load_rrm(os.path.join(tiny_run["run"], "sft_p1"))
    rows = C.read_jsonl(os.path.join(tiny_run["run"], "data", "pairs_train.jsonl"))[:1]
    out = C.evaluate_pairs(model, processor, rows, max_new_tokens=6)
    assert out["pairs"] == 1 and len(out["scores"]) == 2


def test_missing_sft_set_is_a_clear_error(tiny_run, tmp_path):
    args = sft_rrm.Args(model=tiny_run["base"], run_dir=str(tmp_path), report_to="none")
    with pytest.raises(C.DataError, match="sft_think_verify.jsonl: file not found"):
        sft_rrm.main(args)


def test_freeze_vision_trains_the_language_side_only(tiny_run):
    """--freeze_vision: the saved vision tower equals the base's, the language model moved."""
    sft_rrm.main(sft_rrm.Args(model=tiny_run["base"], run_dir=tiny_run["run"], output_name="sft_fv", report_to="none",
                              freeze_vision=True, max_steps=2, batch_size=8, per_device_batch_size=8,
                              eval_max_pairs=2, max_new_tokens=8))
    base, _ = C.load_rrm(tiny_run["base"])
    tuned, _ = C.load_rrm(os.path.join(tiny_run["run"], "sft_fv"))
    b, t = dict(base.named_parameters()), dict(tuned.named_parameters())
    vis = [k for k in b if ".visual." in f".{k}"]
    assert vis and all(torch.equal(b[k], t[k]) for k in vis)
    assert any(not torch.equal(b[k], t[k]) for k in b if "language_model" in k)


def test_mix_data_rows_carry_their_own_chat(tiny_run, tmp_path):
    """--mix_data: a generic row {messages, images, answer} is encoded and masked exactly like
    an SFT row with the same chat, images and completion; a malformed one names its line."""
    model, processor = C.load_rrm(tiny_run["base"])
    rows = C.read_jsonl(os.path.join(tiny_run["run"], "data", "sft_think_verify.jsonl"))[:2]
    mixed = [{"id": f"mix-{i}", "messages": C.verify_messages(r["instruction"], r["principles"], "compact"),
              "images": [r["source"], r["edited"]], "answer": r["target"]} for i, r in enumerate(rows)]
    with torch.no_grad():
        a, n_a = sft_rrm.sft_loss(model, processor, rows, "compact", 1024)
        b, n_b = sft_rrm.sft_loss(model, processor, mixed, "compact", 1024)
        c, _ = sft_rrm.sft_loss(model, processor, [rows[0], mixed[1]], "compact", 1024)  # both kinds in one batch
    assert n_a == n_b and torch.allclose(a, b) and torch.allclose(a, c, atol=1e-6)
    bad = tmp_path / "mix.jsonl"
    bad.write_text(json.dumps(mixed[0]) + "\n" + json.dumps({"id": "x", "messages": []}) + "\n")
    with pytest.raises(C.DataError, match=r"mix.jsonl line 2: missing field"):
        sft_rrm.main(sft_rrm.Args(model=tiny_run["base"], run_dir=tiny_run["run"], output_name="sft_mix",
                                  report_to="none", mix_data=str(bad)))
