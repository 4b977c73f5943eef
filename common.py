"""common.py -- the small shared core of edit-r1 (Edit-R1, CVPR 2026).

Everything the five stage scripts share lives here, as plain functions:

  A. Principles      the schema (question + category) and a tolerant parser for a VLM's
                     decomposition output                                  (paper Sec. 3.1)
  B. Prompts         chat messages with image slots for Qwen2.5-VL: decomposition, RRM
                     verification, inspector, GEdit-style judge (SC / PQ)
  C. Parsers         RRM output -> per-point 0/1, average_score, final <score>; inspector
                     gold labels; judge sub-scores. They never raise and never invent a score.
  D. Reward math     score aggregation Phi(.), inspector selection, GCPO win/loss ratios and
                     advantages (Eq. 2-3), GRPO group-normalised advantages, the PPO clipped
                     surrogate (Eq. 4), GEdit SC/PQ/O.

Every formula has a worked example that runs as a doctest (`pytest --doctest-modules common.py`).
This file is the bottom of the house: it imports nothing from the project.

Dimension legend used in comments:
  P = preference pairs, N = trajectories per image, G = edits per group,
  B = sequences in a batch, T = completion tokens, K = principles.
"""
from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import re
import sys
from typing import Any

import numpy as np
import torch

# =========================================================================================
# A. Principles (paper Sec. 3.1: "decompose the instruction into verifiable principles")
# =========================================================================================
# A principle is {"question": str, "category": one of CATEGORIES}. The paper's decomposition
# prompt uses the names on the right; we store the short names on the left.
CATEGORIES = ("follow", "keep", "quality")
CATEGORY_ALIASES = {
    "follow": "follow", "instruction following": "follow", "instruction-following": "follow",
    "instruction_following": "follow", "following": "follow",
    "keep": "keep", "feature preservation": "keep", "feature-preservation": "keep",
    "feature_preservation": "keep", "preservation": "keep",
    "quality": "quality", "image quality": "quality", "image-quality": "quality",
    "image_quality": "quality",
}
# What the prompts show the model (the paper's names).
CATEGORY_DISPLAY = {"follow": "Instruction Following", "keep": "Feature Preservation",
                    "quality": "Image Quality"}


def normalize_category(name: Any) -> str | None:
    """Map a category name (ours or the paper's, any case) to 'follow'/'keep'/'quality'.

    >>> normalize_category("Feature Preservation"), normalize_category(" FOLLOW "), normalize_category("style")
    ('keep', 'follow', None)
    """
    if not isinstance(name, str):
        return None
    return CATEGORY_ALIASES.get(" ".join(name.strip().lower().split()))


def _loads_loose(text: str) -> Any:
    """json.loads, then a forgiving fallback: trailing commas, single quotes, True/None."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError):
        pass
    cleaned = re.sub(r",\s*([\]}])", r"\1", text)  # trailing commas
    try:
        return json.loads(cleaned)
    except (json.JSONDecodeError, RecursionError, ValueError):
        pass
    try:  # single-quoted "JSON" is a Python literal
        return ast.literal_eval(cleaned.replace("true", "True").replace("false", "False")
                                .replace("null", "None"))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _find_bracketed(text: str, open_ch: str, close_ch: str) -> list[str]:
    """All top-level balanced substrings text[i:j] starting with open_ch (quotes respected)."""
    out, depth, start, quote, escape = [], 0, -1, None, False
    for i, ch in enumerate(text):
        if quote:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == quote:
                quote = None
            continue
        if ch in "\"'" and depth > 0:
            quote = ch
        elif ch == open_ch:
            if depth == 0:
                start = i
            depth += 1
        elif ch == close_ch and depth > 0:
            depth -= 1
            if depth == 0:
                out.append(text[start:i + 1])
    return out


def parse_principles(text: str) -> dict:
    """Parse a VLM's decomposition output into principles. Never raises.

    Accepts a JSON array of {"question", "category"} objects anywhere in the text: inside
    code fences or prose, with single quotes or trailing commas. Validates: non-empty,
    every question a non-empty string, every category known (paper or short names).

    Returns {"status": "ok" | "error", "principles": list | None, "reason": str}.

    >>> out = parse_principles('''Sure! ```json
    ... [{'question': 'Is the car red?', 'category': 'Instruction Following'},
    ...  {"question": "Is the sky unchanged?", "category": "Feature Preservation"},]
    ... ```''')
    >>> out["status"], [p["category"] for p in out["principles"]]
    ('ok', ['follow', 'keep'])
    >>> parse_principles('[{"question": "Is it nice?", "category": "vibes"}]')["reason"]
    "principle 1: unknown category 'vibes'"
    """
    if not isinstance(text, str):
        return {"status": "error", "principles": None, "reason": "output is not a string"}
    last_reason = "no JSON array of principles found"
    for candidate in reversed(_find_bracketed(text, "[", "]")):  # the answer is usually last
        data = _loads_loose(candidate)
        if not isinstance(data, list):
            continue
        if not data:
            last_reason = "empty list of principles"
            continue
        principles, reason = [], ""
        for i, item in enumerate(data, 1):
            if not isinstance(item, dict):
                reason = f"principle {i}: not an object"
                break
            q, cat = item.get("question"), normalize_category(item.get("category"))
            if not isinstance(q, str) or not q.strip():
                reason = f"principle {i}: missing or empty 'question'"
                break
            if cat is None:
                reason = f"principle {i}: unknown category {item.get('category')!r}"
                break
            principles.append({"question": q.strip(), "category": cat})
        if reason:
            last_reason = reason
            continue
        return {"status": "ok", "principles": principles, "reason": ""}
    return {"status": "error", "principles": None, "reason": last_reason}


# =========================================================================================
# B. Prompt templates (our own wording), as Qwen2.5-VL chat messages.
# =========================================================================================
# An image slot is {"type": "image"}; the caller passes the PIL images to the processor in
# the order the slots appear (source first, then edited). For OpenAI-style endpoints the
# backend swaps each slot for an image_url data URL.

def _msgs(system: str, user: list[dict]) -> list[dict]:
    return [{"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": user}]


DECOMPOSE_SYSTEM = (
    "You plan the checks for an image edit. Given the source image and an edit instruction, "
    "write about ten yes/no questions that a checker can answer by looking at the edited "
    "image next to the source. Use three categories: 'Instruction Following' (3-4 questions: "
    "was each requested change made?), 'Feature Preservation' (3-4 questions: did everything "
    "the instruction does not mention stay as it was?) and 'Image Quality' (2-3 questions: "
    "is the result free of artefacts, distortions and noise?). Answer with a JSON array of "
    'objects with the fields "question" and "category", and nothing else.')


def decompose_messages(instruction: str, examples: list[dict] | None = None) -> list[dict]:
    """Messages for principle decomposition (build_data.py step 1); one image slot (source).

    `examples` are in-context demonstrations [{"instruction", "principles"}] (the paper
    draws 4 from a pool of 60 hand-written ones).

    >>> m = decompose_messages("make the circle red")
    >>> [c["type"] for c in m[1]["content"]]
    ['text', 'image', 'text']
    """
    demo = ""
    for ex in examples or []:
        demo += (f"Example instruction: {ex['instruction']}\nExample answer: "
                 f"{json.dumps(ex['principles'])}\n\n")
    return _msgs(DECOMPOSE_SYSTEM, [
        {"type": "text", "text": demo + "Source image:"}, {"type": "image"},
        {"type": "text", "text": f"Instruction: {instruction}\nQuestions:"}])


# The RRM's rules for the final holistic score (METHOD.md, "The RRM's output").
VERIFY_RULES = (
    "Scoring rules for the final score (0-10, decimals allowed): an edit that changes nothing "
    "scores 0. A change nobody asked for (to the background or to another subject) costs more "
    "than a requested change that was missed. Deduct in proportion to how much work a re-edit "
    "would take. A requested move must shift the object clearly (at least a tenth of the "
    "image); a smaller shift does not count as done.")
VERIFY_FORMAT = (
    "Answer in this order: first <think>...</think> with your reasoning, describing what each "
    "image shows and then checking the questions one by one; then <points>[...]</points>, a "
    'JSON list with one {"question": <number>, "score": 0 or 1} per question (1 = satisfied, '
    "0 = not satisfied or unsure); then <average_score>x</average_score>, the mean of the "
    "points; then <score>y</score>, your final score from 0 to 10.")
VERIFY_SYSTEMS = {
    # "full" is the GPU-scale default; "compact" keeps the mini world's prompts short
    # (prompt tokens dominate the tiny model's cost on CPU). Both ask for the same output.
    "full": "You are a careful judge of image edits. You see a source image, an edited image "
            "and the edit instruction, with numbered yes/no questions that together define a "
            "good edit. " + VERIFY_RULES + " " + VERIFY_FORMAT,
    "compact": "Judge the edit. Check each question, then give points, average and score.",
    # A second wording, used by the simulated/real VLM pool to vary prompts.
    "strict": "You are a strict reviewer of image edits: when in doubt, a question is not "
              "satisfied. " + VERIFY_RULES + " " + VERIFY_FORMAT,
}


def format_principles(principles: list[dict]) -> str:
    """Numbered list shown to the RRM.

    >>> print(format_principles([{"question": "Is the circle red?", "category": "follow"}]))
    1. [Instruction Following] Is the circle red?
    """
    return "\n".join(f"{i}. [{CATEGORY_DISPLAY[p['category']]}] {p['question']}"
                     for i, p in enumerate(principles, 1))


def verify_messages(instruction: str, principles: list[dict], variant: str = "full") -> list[dict]:
    """Messages for the RRM verifier (paper Sec. 3.1): source + edited image, instruction,
    numbered principles -> reasoning, per-point 0/1, average_score, <score>.

    >>> m = verify_messages("remove the cat", [{"question": "Is the cat gone?", "category": "follow"}], "compact")
    >>> [c["type"] for c in m[1]["content"]]
    ['text', 'image', 'text', 'image', 'text']
    """
    return _msgs(VERIFY_SYSTEMS[variant], [
        {"type": "text", "text": "Source:"}, {"type": "image"},
        {"type": "text", "text": "Edited:"}, {"type": "image"},
        {"type": "text", "text": f"Instruction: {instruction}\nQuestions:\n"
                                 f"{format_principles(principles)}"}])


INSPECT_SYSTEM = (
    "You are the inspector of an image-edit dataset. You see the source image, the edited "
    "image, the instruction and numbered yes/no questions, and some candidate judgements "
    "written by other models. Use the candidates only as hints: look at the images yourself "
    "and do not copy them. For every question, in order, give the correct answer (1 = yes, "
    "0 = no) and a one-line reason. Answer with one JSON object: "
    '{"gold": [{"question": <number>, "gold": 0 or 1, "reason": "..."}]}.')
# build_data.py --noop_check (an ablation beyond the paper): the inspector also says whether the
# edit changed anything, so that selection can enforce METHOD.md's score rule "a no-op scores 0".
INSPECT_CHANGED = (' Also say whether the edited image differs from the source in any way: add '
                   '"changed": true or false to the object.')


def inspector_messages(instruction: str, principles: list[dict], trajectories: list[str],
                       ask_changed: bool = False) -> list[dict]:
    """Messages for the external inspector (build_data.py step 4); ask_changed adds the
    question "did anything change?" (build_data.py --noop_check).

    >>> m = inspector_messages("x", [{"question": "q?", "category": "keep"}], ["<score>3</score>"])
    >>> "Candidate 1" in m[1]["content"][-1]["text"]
    True
    """
    cands = "\n\n".join(f"Candidate {i}:\n{t}" for i, t in enumerate(trajectories, 1))
    return _msgs(INSPECT_SYSTEM + (INSPECT_CHANGED if ask_changed else ""), [
        {"type": "text", "text": "Source:"}, {"type": "image"},
        {"type": "text", "text": "Edited:"}, {"type": "image"},
        {"type": "text", "text": f"Instruction: {instruction}\nQuestions:\n"
                                 f"{format_principles(principles)}\n\n{cands}"}])


# GEdit-Bench-style judge (METHOD.md, Evaluation): SC from [source, edited] as two 0-10
# sub-scores (edit success, over-editing); PQ from the edited image alone (naturalness,
# artefacts). The answer is a JSON object with a short reasoning and the two numbers.
JUDGE_FORMAT = ('Answer with one JSON object: {"reasoning": "...", "score": [a, b]} where a '
                "and b are numbers from 0 to 10.")
SC_SYSTEM = ("You rate an image edit. Score a: how well the edited image carries out the "
             "instruction (0 = not at all, 10 = perfectly). Score b: how little the edit "
             "changed beyond what was asked (0 = the image was redrawn, 10 = only the "
             "requested change). " + JUDGE_FORMAT)
PQ_SYSTEM = ("You rate the quality of an image. Score a: how natural it looks (0 = "
             "unnatural, 10 = natural). Score b: how free it is of artefacts, blur, noise "
             "and distortion (0 = heavy, 10 = none). " + JUDGE_FORMAT)
# A VIEScore-style scalar scorer (the "global scorer" the paper argues against), for the
# verifier-vs-scorer baseline in evaluate.py.
SCALAR_SYSTEM = ("Rate this image edit with one number from 0 to 10 for how good it is "
                 "overall. Answer as <score>x</score>.")


def judge_sc_messages(instruction: str) -> list[dict]:
    """GEdit SC judge: [source, edited] + instruction -> two sub-scores."""
    return _msgs(SC_SYSTEM, [{"type": "text", "text": "Source:"}, {"type": "image"},
                             {"type": "text", "text": "Edited:"}, {"type": "image"},
                             {"type": "text", "text": f"Instruction: {instruction}"}])


def judge_pq_messages() -> list[dict]:
    """GEdit PQ judge: the edited image alone -> two sub-scores."""
    return _msgs(PQ_SYSTEM, [{"type": "text", "text": "Image:"}, {"type": "image"}])


def scalar_messages(instruction: str) -> list[dict]:
    """VIEScore-style global scorer: [source, edited] + instruction -> <score>x</score>."""
    return _msgs(SCALAR_SYSTEM, [{"type": "text", "text": "Source:"}, {"type": "image"},
                                 {"type": "text", "text": "Edited:"}, {"type": "image"},
                                 {"type": "text", "text": f"Instruction: {instruction}"}])


def format_rrm_output(reasoning: str, points: list[int], score: float) -> str:
    """Write a trajectory in the RRM output format (the SFT target; what the parser reads).

    The average is computed from the points so the two can never disagree.

    >>> print(format_rrm_output("The circle is red now.", [1, 0], 4.5))
    <think>The circle is red now.</think>
    <points>[{"question": 1, "score": 1}, {"question": 2, "score": 0}]</points>
    <average_score>0.50</average_score>
    <score>4.5</score>
    """
    pts = ", ".join(f'{{"question": {i}, "score": {int(s)}}}' for i, s in enumerate(points, 1))
    avg = sum(points) / len(points) if points else 0.0
    return (f"<think>{reasoning}</think>\n<points>[{pts}]</points>\n"
            f"<average_score>{avg:.2f}</average_score>\n<score>{score:g}</score>")


# =========================================================================================
# C. Parsers. Rule: any string in, a dict out; never raise; never invent a number.
# =========================================================================================
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
# "<score>7.5</score>"; the paper's prompt closes with the malformed "<\score>", accept it.
_SCORE_RE = re.compile(r"<score>\s*(" + _NUM + r")\s*<\s*[/\\]\s*score\s*>", re.I)
_AVG_RE = re.compile(r"average_score\W{0,4}?\s*(" + _NUM + r")", re.I)
_POINTS_RE = re.compile(r"<points>(.*?)<\s*[/\\]\s*points\s*>", re.I | re.S)


def _to_float(s: str) -> float | None:
    try:
        v = float(s)
    except (TypeError, ValueError, OverflowError):
        return None
    return v if math.isfinite(v) else None


def _parse_points(text: str) -> list[int] | None:
    """Per-point 0/1 list from <points>[...]</points>, or the last JSON list of
    {"question", "score"} objects anywhere. None if absent or not all 0/1."""
    m = _POINTS_RE.search(text)
    candidates = [m.group(1)] if m else []
    candidates += list(reversed(_find_bracketed(text, "[", "]")))
    for cand in candidates:
        data = _loads_loose(cand.strip())
        if not isinstance(data, list) or not data:
            continue
        if not all(isinstance(d, dict) and "score" in d for d in data):
            continue
        pts = []
        for d in data:
            v = d["score"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in (0, 1):
                return None
            pts.append(int(v))
        return pts
    return None


# A no-op call in the reasoning: the mini world's two wordings ("nothing changed." at the end,
# "changed: nothing." in the change line of sim.CHANGE_LINE) and the plain phrasings a VLM uses.
_UNCHANGED_RE = re.compile(r"\b(nothing (?:has |was )?changed|changed: nothing|no changes? (?:was |were |has been |have been )?made"
                           r"|(?:is|are|looks|look) identical to the (?:original|source))\b", re.IGNORECASE)


def says_nothing_changed(text: str) -> bool:
    """Whether an RRM's reasoning (the text before its points) calls the edit a no-op.
    METHOD.md: "a no-op edit scores 0"; aggregate_score(noop_call=True) reads this call.

    >>> says_nothing_changed("changed: nothing. q1 left: want red circle, see green circle, no.")
    True
    >>> says_nothing_changed("The edited image is identical to the original."), says_nothing_changed("q1 ... yes.")
    (True, False)
    >>> says_nothing_changed("nothing else changed. <points>[]</points> nothing changed")  # only the reasoning counts
    False
    """
    reasoning = text.split("<points>")[0] if "<points>" in text else text.split("[{")[0]
    reasoning = re.sub(r"\bnothing else changed\b", "", reasoning, flags=re.IGNORECASE)
    return bool(_UNCHANGED_RE.search(reasoning))


_VERDICT_LINE_RE = re.compile(r"\bq(\d+)\b[^.<]*?\b(yes|no)\.", re.IGNORECASE)


def reasoning_verdicts(text: str, n_principles: int | None = None) -> list[int] | None:
    """The per-principle 0/1 verdicts the reasoning itself states, one line per principle in
    the mini trajectories' format ("q3 bottom left: want red triangle, see blue triangle, no.");
    None unless every q1..qN has exactly one (N = n_principles or the highest q seen). A judge's
    <points> need not copy its own lines (session 18: 13% of lines differ on the mini SFT-RRM);
    aggregate_score(verdicts="reasoning") prices these instead. Free-form reasoning gives None.

    >>> reasoning_verdicts("changed: x. q1 top: want red, see red, yes. q2 other cells: want same, see top added, no.")
    [1, 0]
    >>> reasoning_verdicts("q1 top: want red, see red, yes.", 2), reasoning_verdicts("The edit looks fine.")
    (None, None)
    """
    reasoning = text.split("<points>")[0] if "<points>" in text else text
    found: dict[int, list[int]] = {}
    for q, v in _VERDICT_LINE_RE.findall(reasoning):
        found.setdefault(int(q), []).append(int(v.lower() == "yes"))
    n = n_principles or (max(found) if found else 0)
    if n == 0 or sorted(found) != list(range(1, n + 1)) or any(len(v) != 1 for v in found.values()):
        return None
    return [found[q][0] for q in range(1, n + 1)]


def parse_rrm_output(text: Any, n_principles: int | None = None) -> dict:
    """Parse an RRM trajectory. Never raises, never invents a score.

    Returns {"status", "score", "points", "average", "says_unchanged", "reasoning_points", "flags",
    "reason"}:
      status  "ok"            a final score in [0, 10] was found (flags may still be set)
              "no_score"      no <score>x</score> (or a non-number inside it)
              "out_of_range"  the score is outside [0, 10]; `score` is None, never clamped
      score   float | None    the holistic score, the default reward Phi(.)
      points  list[int] | None per-principle 0/1 in order
      average float | None    the model's own average_score
      says_unchanged bool     the reasoning calls the edit a no-op (says_nothing_changed)
      reasoning_points list[int] | None  the verdicts the reasoning lines state (reasoning_verdicts)
      flags   e.g. "average_mismatch", "points_count_mismatch", "multiple_scores",
              "backslash_close_tag", "no_points", "no_average"

    >>> r = parse_rrm_output(format_rrm_output("ok", [1, 1, 0], 7), n_principles=3)
    >>> r["status"], r["score"], r["points"], r["average"], r["flags"]
    ('ok', 7.0, [1, 1, 0], 0.67, [])
    >>> parse_rrm_output("looks great <score>8<\\\\score>")["flags"]
    ['backslash_close_tag', 'no_points', 'no_average']
    >>> parse_rrm_output("I give it 11/10 <score>11</score>")["status"]
    'out_of_range'
    >>> parse_rrm_output(None)["status"]
    'no_score'
    """
    out = {"status": "no_score", "score": None, "points": None, "average": None,
           "says_unchanged": False, "reasoning_points": None, "flags": [], "reason": ""}
    if not isinstance(text, str):
        out["reason"] = f"output is {type(text).__name__}, not a string"
        return out
    flags = out["flags"]
    out["says_unchanged"] = says_nothing_changed(text)
    out["reasoning_points"] = reasoning_verdicts(text, n_principles)
    # Points and average are read even when the final score is missing: the inspector and
    # the weighted aggregate use them.
    out["points"] = _parse_points(text)
    m = _AVG_RE.search(text)
    out["average"] = _to_float(m.group(1)) if m else None
    matches = _SCORE_RE.findall(text)
    if re.search(r"<score>\s*" + _NUM + r"\s*<\s*\\", text):
        flags.append("backslash_close_tag")
    if len(matches) > 1:
        flags.append("multiple_scores")  # we take the last: the model's final word
    if out["points"] is None:
        flags.append("no_points")
    elif n_principles is not None and len(out["points"]) != n_principles:
        flags.append("points_count_mismatch")
    if out["average"] is None:
        flags.append("no_average")
    elif out["points"] and abs(out["average"] - sum(out["points"]) / len(out["points"])) > 0.01:
        flags.append("average_mismatch")
    if not matches:
        out["reason"] = "no <score>number</score> found"
        return out
    value = _to_float(matches[-1])
    if value is None:
        out["reason"] = f"score {matches[-1]!r} is not a finite number"
        return out
    if not 0.0 <= value <= 10.0:
        out["status"], out["reason"] = "out_of_range", f"score {value} outside [0, 10]"
        return out
    out["status"], out["score"] = "ok", value
    return out


def parse_inspector(text: Any, n_principles: int) -> dict:
    """Parse the inspector's {"gold": [{question, gold, reason}, ...][, "changed": bool]}.
    Never raises.

    Returns {"status": "ok" | "error", "gold": list[int] | None, "reasons": list[str], "reason",
    "changed": True / False, or None when the answer has no boolean "changed"}.

    >>> parse_inspector('{"gold": [{"question": 1, "gold": 1, "reason": "red"}, {"question": 2, "gold": 0, "reason": "moved"}]}', 2)["gold"]
    [1, 0]
    >>> parse_inspector('{"gold": [{"question": 1, "gold": 1}]}', 2)["reason"]
    'expected 2 gold labels, got 1'
    >>> parse_inspector('{"gold": [{"question": 1, "gold": 0}], "changed": false}', 1)["changed"]
    False
    """
    out = {"status": "error", "gold": None, "reasons": [], "reason": "", "changed": None}
    if not isinstance(text, str):
        out["reason"] = "output is not a string"
        return out
    for cand in reversed(_find_bracketed(text, "{", "}")):
        data = _loads_loose(cand)
        if not isinstance(data, dict) or not isinstance(data.get("gold"), list):
            continue
        gold, reasons = [], []
        for d in data["gold"]:
            v = d.get("gold") if isinstance(d, dict) else None
            if isinstance(v, bool) or v not in (0, 1):
                out["reason"] = f"gold label {v!r} is not 0 or 1"
                return out
            gold.append(int(v))
            reasons.append(str(d.get("reason", "")))
        if len(gold) != n_principles:
            out["reason"] = f"expected {n_principles} gold labels, got {len(gold)}"
            return out
        changed = data.get("changed")
        out.update(status="ok", gold=gold, reasons=reasons, changed=changed if isinstance(changed, bool) else None)
        return out
    out["reason"] = 'no JSON object with a "gold" list found'
    return out


def parse_judge(text: Any) -> dict:
    """Parse a GEdit-style judge answer {"reasoning": ..., "score": [a, b]}. Never raises.

    >>> parse_judge('```json\\n{"reasoning": "fine", "score": [7, 8.5]}\\n```')["scores"]
    [7.0, 8.5]
    >>> parse_judge('{"score": [7, 12]}')["status"]
    'error'
    """
    out = {"status": "error", "scores": None, "reason": ""}
    if not isinstance(text, str):
        out["reason"] = "output is not a string"
        return out
    for cand in reversed(_find_bracketed(text, "{", "}")):
        data = _loads_loose(cand)
        if not isinstance(data, dict) or "score" not in data:
            continue
        s = data["score"]
        if (not isinstance(s, list) or len(s) != 2 or
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in s)):
            out["reason"] = f"'score' must be a list of two numbers, got {s!r}"
            return out
        vals = [float(v) for v in s]
        if not all(math.isfinite(v) and 0 <= v <= 10 for v in vals):
            out["reason"] = f"sub-scores {vals} outside [0, 10]"
            return out
        out.update(status="ok", scores=vals)
        return out
    out["reason"] = 'no JSON object with a "score" field found'
    return out


# =========================================================================================
# D. Reward math
# =========================================================================================
DEFAULT_WEIGHTS = {"follow": 0.5, "keep": 0.3, "quality": 0.2}
DEFAULT_COSTS = {"follow": 4.0, "keep": 5.0, "quality": 2.0}   # points lost per failed principle


def fails_every_follow(points: list[int], principles: list[dict]) -> bool:
    """True when there is a Follow principle and every Follow point is 0 (aggregate_score's
    follow_gate; what the points of a no-op look like).

    >>> ps = [{"category": "follow"}, {"category": "follow"}, {"category": "keep"}]
    >>> fails_every_follow([0, 0, 1], ps), fails_every_follow([0, 1, 1], ps), fails_every_follow([0], ps[2:])
    (True, False, False)
    """
    follow = [p for p, pr in zip(points, principles) if pr["category"] == "follow"]
    return bool(follow) and not any(follow)


def parse_costs(spec: str) -> dict | None:
    """'follow:4,keep:10,quality:2' -> {category: cost} for aggregate_score(costs=...);
    '' -> None (DEFAULT_COSTS). Anything else, or a category missing, raises SystemExit.

    >>> parse_costs("follow:4,keep:10,quality:2"), parse_costs("")
    ({'follow': 4.0, 'keep': 10.0, 'quality': 2.0}, None)
    """
    if not spec:
        return None
    try:
        costs = {c: float(v) for c, v in (x.split(":") for x in spec.split(","))}
    except ValueError:
        costs = {}
    if sorted(costs) != sorted(CATEGORIES):
        raise SystemExit(f"--costs {spec!r}: expected follow:F,keep:K,quality:Q (all three categories)")
    return costs


def aggregate_score(parsed: dict, principles: list[dict] | None = None, mode: str = "holistic",
                    weights: dict | None = None, costs: dict | None = None,
                    follow_gate: bool = False, noop_call: bool = False,
                    verdicts: str = "points") -> float | None:
    """Phi(.): one scalar reward from a parsed RRM output, on 0..10; None if unavailable.
    weights / costs: per-category dicts for "weighted" / "deductions" and "capped" (None = the
    defaults below; a given dict must name all three categories).
    follow_gate=True (any mode): 0 when the RRM's own points fail every Follow principle, else
    the mode's score. METHOD.md: "a no-op edit scores 0"; from the points alone a no-op and an
    edit that made none of the requested changes look alike (every Follow fails), so the gate
    scores both 0; otherwise it only passes the mode's score on. It needs that score and one
    point per principle (else None); with no Follow principle it never fires.
    verdicts="reasoning": the points-based modes read the 0/1 verdicts the reasoning lines state
    (parsed["reasoning_points"], reasoning_verdicts) instead of the <points> block; None where the
    reasoning does not state one per principle.
    verdicts="probs": the same modes on soft verdicts, the RRM's own probability of "yes" at each
    <points> digit (parsed["soft_points"], set by verdict_probabilities): a failed principle
    costs its price times P(no), so "deductions" is the expected deductions under the RRM's own
    belief; None where they are missing. (The follow gate fires only when every Follow
    probability is exactly 0, i.e. practically never: use noop_call.)
    noop_call=True (any mode): 0 when the RRM's reasoning says the edit changed nothing
    (parsed["says_unchanged"], says_nothing_changed), else the mode's score; None when the mode
    has no score. Unlike the gate it tells a no-op from a failed attempt, if the RRM does. With
    mode="deductions" it is METHOD's description of the score made a rule: a no-op 0, an
    unrequested change (Keep) charged more than an unmet point (Follow).

    mode="holistic" (default, the paper's reward): the number inside <score>.
    mode="weighted": 10 * sum_c w_c * mean(points in category c) / sum_c w_c over the
      categories present. The paper mentions a "weighted aggregate of principle outcomes"
      without weights; ours default to follow 0.5, keep 0.3, quality 0.2 (DEFAULT_WEIGHTS).
      Needs one point per principle, else None; like "deductions", it reads only the points,
      so an answer whose <score> is missing or out of range still gets a reward.
    mode="deductions", after METHOD.md ("The RRM's output": "deductions follow how costly a
      re-edit would be"): 10 - sum of a cost per failed principle, clipped to 0..10.
      DEFAULT_COSTS: a failed Keep (an unrequested change) costs 5, more than an unmet Follow,
      4; Quality 2. Unlike "weighted", every failed Keep costs the same however many Keep
      points there are. The points cannot tell a no-op from a missed edit (both fail Follow,
      pass Keep), so a no-op is NOT 0 here. The costs are the mini world's human utility's
      (miniworld/world.py), not the paper's (it gives none); on real data set them from how
      your raters weigh failures. Needs one point per principle, else None.
    mode="capped": min(<score>, deductions): the holistic score, never above what the RRM's own
      verdicts allow. It keeps what only the holistic score knows (a no-op scores 0) and charges
      every failed Keep in full. Needs a valid <score> and one point per principle, else None.

    >>> ps = [{"question": "a", "category": "follow"}, {"question": "b", "category": "keep"},
    ...       {"question": "c", "category": "keep"}, {"question": "d", "category": "quality"}]
    >>> parsed = parse_rrm_output(format_rrm_output("", [1, 1, 0, 1], 6.0))
    >>> aggregate_score(parsed), aggregate_score(parsed, ps, "weighted")   # 10*(.5*1+.3*.5+.2*1)
    (6.0, 8.5)
    >>> aggregate_score(parsed, ps, "deductions"), aggregate_score(parsed, ps, "capped")   # 10 - 5 (one Keep)
    (5.0, 5.0)
    >>> noop = parse_rrm_output(format_rrm_output("", [0, 1, 1, 1], 0.5))
    >>> aggregate_score(noop, ps, "deductions"), aggregate_score(noop, ps, "capped")       # 10 - 4; min(0.5, 6)
    (6.0, 0.5)
    >>> lenient = parse_rrm_output(format_rrm_output("", [0, 1, 1, 1], 7.5))    # a no-op scored 7.5
    >>> aggregate_score(lenient, ps, follow_gate=True), aggregate_score(parsed, ps, follow_gate=True)
    (0.0, 6.0)
    >>> soft = {**parsed, "soft_points": [0.9, 1.0, 0.2, 1.0]}      # P(yes): 10 - 4*.1 - 5*.8
    >>> round(aggregate_score(soft, ps, "deductions", verdicts="probs"), 2)
    5.6
    >>> called = parse_rrm_output(format_rrm_output("changed: nothing.", [0, 1, 1, 1], 7.5))
    >>> aggregate_score(called, ps, "deductions", noop_call=True), aggregate_score(lenient, ps, "deductions", noop_call=True)
    (0.0, 6.0)
    """
    if verdicts == "reasoning":  # the verdicts its reasoning lines state, in place of <points>
        parsed = {**parsed, "points": parsed.get("reasoning_points")}
    elif verdicts == "probs":    # the RRM's P(yes) per point (verdict_probabilities), in place of 0/1
        parsed = {**parsed, "points": parsed.get("soft_points")}
    elif verdicts != "points":
        raise ValueError(f"unknown verdicts source {verdicts!r} (use 'points', 'reasoning' or 'probs')")
    if noop_call:
        score = aggregate_score(parsed, principles, mode, weights, costs, follow_gate)
        return None if score is None else (0.0 if parsed.get("says_unchanged") else score)
    if follow_gate:
        score, pts = aggregate_score(parsed, principles, mode, weights, costs), parsed.get("points")
        if score is None or principles is None or pts is None or len(pts) != len(principles):
            return None
        return 0.0 if fails_every_follow(pts, principles) else score
    if mode == "holistic":
        return parsed["score"] if parsed["status"] == "ok" else None
    if mode not in ("weighted", "deductions", "capped"):
        raise ValueError(f"unknown aggregation mode {mode!r} (use 'holistic', 'weighted', 'deductions' or 'capped')")
    pts = parsed.get("points")
    if principles is None or pts is None or len(pts) != len(principles):
        return None
    if mode in ("deductions", "capped"):
        costs = costs or DEFAULT_COSTS
        lost = sum(costs[pr["category"]] * (1 - p) for p, pr in zip(pts, principles))  # p in {0, 1}, or P(yes)
        deductions = float(min(10.0, max(0.0, 10.0 - lost)))
        if mode == "deductions":
            return deductions
        return min(parsed["score"], deductions) if parsed["status"] == "ok" else None
    weights = weights or DEFAULT_WEIGHTS
    num = den = 0.0
    for cat in CATEGORIES:
        vals = [p for p, pr in zip(pts, principles) if pr["category"] == cat]
        if vals:
            num += weights[cat] * sum(vals) / len(vals)
            den += weights[cat]
    return 10.0 * num / den if den > 0 else None


def verification_accuracy(points: list[int] | None, gold: list[int]) -> float | None:
    """Fraction of a trajectory's per-point verdicts that match the inspector's gold labels.
    None when the trajectory has no points or the wrong number of them.

    >>> verification_accuracy([1, 0, 1, 1], [1, 1, 1, 1])
    0.75
    """
    if points is None or len(points) != len(gold) or not gold:
        return None
    return sum(int(p == g) for p, g in zip(points, gold)) / len(gold)


def select_best_trajectory(parsed: list[dict], gold: list[int], tie_score: str = "higher",
                           changed: bool | None = None) -> int | None:
    """Index of the SFT target among K parsed trajectories (build_data.py steps 4 and 5).

    Paper's rule: highest verification accuracy; ties -> higher average_score, then higher
    final score, then lower index. Trajectories without a usable final score or points are
    never chosen. None if none qualifies. tie_score="lower" breaks the last tie the other way
    (the stricter of equally verified trajectories; an ablation, see README "build_data.py":
    in the mini world the paper's rule selects the pool's lenient scores, no-ops included).
    changed=False (build_data.py --noop_check: the inspector saw no change at all) puts the
    trajectories that obey METHOD.md's "a no-op scores 0" first, then the rules above.

    >>> mk = lambda pts, s: parse_rrm_output(format_rrm_output("", pts, s))
    >>> trajs = [mk([1, 0, 0], 3), mk([1, 1, 0], 5), mk([1, 1, 0], 6), mk([0, 0, 1], 9)]
    >>> select_best_trajectory(trajs, gold=[1, 1, 1])   # 1,2 tie on acc and avg; 2 has higher score
    2
    >>> select_best_trajectory(trajs, gold=[1, 1, 1], tie_score="lower")
    1
    >>> select_best_trajectory(trajs + [mk([0, 0, 1], 0)], gold=[0, 0, 1], changed=False)  # 3 ties 4 on points
    4
    """
    if tie_score not in ("higher", "lower"):
        raise ValueError(f"tie_score must be 'higher' (the paper's) or 'lower', not {tie_score!r}")
    best, best_key = None, None
    for i, p in enumerate(parsed):
        acc = verification_accuracy(p.get("points"), gold)
        if acc is None or p.get("status") != "ok":
            continue
        avg = sum(p["points"]) / len(p["points"])
        score = p["score"] if tie_score == "higher" else -p["score"]
        noop_rule = int(changed is not False or p["score"] == 0)   # 0: it scores a no-op above 0
        key = (noop_rule, acc, avg, score, -i)  # noop_rule all 1: max == the paper's tie rules
        if best_key is None or key > best_key:
            best, best_key = i, key
    return best


UNPARSEABLE_POLICIES = ("worst", "exclude")


def gcpo_ratios(win_scores, lose_scores, unparseable: str = "worst"):
    """GCPO win/loss ratios (paper Eq. 2), strict inequalities: ties earn nothing.

        r^w_j = (1/N) * #{k : tau^w_j > tau^l_k}      r^l_j = (1/N) * #{k : tau^l_j < tau^w_k}

    Scores are sequences of floats or None (unparseable). The paper does not say what an
    unparseable trajectory gets; we make it a flag:
      "worst"   (default) it earns ratio 0, the lowest reward its group can give, so the
                policy is pushed away from unparseable output; as an opponent it is not
                counted (the denominator is the number of parseable opponents). It is
                valid for the advantage (mask True).
      "exclude" it earns no reward and takes no part: mask False, its advantage is 0 and
                the group mean is over the parseable trajectories only.
    With no parseable opponent every ratio is 0 (there is nothing to compare against).

    Returns (r_w (N,), r_l (N,), valid_w (N,), valid_l (N,)) as numpy arrays.

    A 3x3 case by hand: winner scores [8, 5, 3], loser scores [6, 5, 2].
    r^w: 8 beats all three -> 3/3; 5 beats only 2 (ties do not count) -> 1/3; 3 beats 2 -> 1/3.
    r^l: 6 is below 8 -> 1/3; 5 is below 8 (not 5) -> 1/3; 2 is below all -> 3/3.

    >>> rw, rl, _, _ = gcpo_ratios([8, 5, 3], [6, 5, 2])
    >>> rw.round(3).tolist(), rl.round(3).tolist()
    ([1.0, 0.333, 0.333], [0.333, 0.333, 1.0])
    >>> rw, rl, vw, vl = gcpo_ratios([8, None], [6, 9], unparseable="worst")
    >>> rw.tolist(), rl.tolist(), vw.tolist()
    ([0.5, 0.0], [1.0, 0.0], [True, True])
    """
    if unparseable not in UNPARSEABLE_POLICIES:
        raise ValueError(f"unparseable must be one of {UNPARSEABLE_POLICIES}, got {unparseable!r}")
    w = np.array([np.nan if s is None else float(s) for s in win_scores], dtype=np.float64)  # (N,)
    l = np.array([np.nan if s is None else float(s) for s in lose_scores], dtype=np.float64)  # (N,)
    ok_w, ok_l = ~np.isnan(w), ~np.isnan(l)
    # (N, N) comparison tables; comparisons with NaN are False, so unparseable opponents add 0
    # to the numerator, and the denominator counts parseable opponents only.
    beats = (w[:, None] > l[None, :])       # beats[j, k]  = tau^w_j > tau^l_k
    below = (l[:, None] < w[None, :])       # below[j, k]  = tau^l_j < tau^w_k
    r_w = beats.sum(1) / max(int(ok_l.sum()), 1)
    r_l = below.sum(1) / max(int(ok_w.sum()), 1)
    if unparseable == "worst":
        valid_w, valid_l = np.ones_like(ok_w), np.ones_like(ok_l)
    else:
        valid_w, valid_l = ok_w, ok_l
    return r_w, r_l, valid_w, valid_l


def centered_advantages(rewards, valid=None):
    """GCPO advantages (paper Eq. 3): A_j = r_j - mean_k r_k within one group. No std.

    Entries with valid=False get advantage 0 and are left out of the mean.

    >>> centered_advantages([1.0, 1/3, 1/3]).round(3).tolist()
    [0.444, -0.222, -0.222]
    >>> centered_advantages([1.0, 0.0, 0.5], valid=[True, True, False]).tolist()
    [0.5, -0.5, 0.0]
    """
    r = np.asarray(rewards, dtype=np.float64)                                  # (N,)
    v = np.ones_like(r, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    adv = np.zeros_like(r)
    if v.any():
        adv[v] = r[v] - r[v].mean()
    return adv


def gcpo_advantages(win_scores, lose_scores, unparseable: str = "worst"):
    """Eq. 2 + Eq. 3 for one preference pair: (A_w (N,), A_l (N,), r_w, r_l).

    >>> aw, al, _, _ = gcpo_advantages([8, 5, 3], [6, 5, 2])
    >>> aw.round(3).tolist(), al.round(3).tolist()
    ([0.444, -0.222, -0.222], [-0.222, -0.222, 0.444])
    """
    r_w, r_l, v_w, v_l = gcpo_ratios(win_scores, lose_scores, unparseable)
    return centered_advantages(r_w, v_w), centered_advantages(r_l, v_l), r_w, r_l


def grpo_advantages(rewards, group_size: int, std: str = "population", eps: float = 1e-4,
                    scope: str = "group", clip: float | None = None):
    """Flow-GRPO advantages: A_i = (tau_i - mean) / (std + eps) within each group of G.

    rewards: flat (num_groups * G,), consecutive G entries form one group.
    std:   "population" (divide by G, numpy's default, Flow-GRPO's choice) or "sample" (G-1).
    scope: "group" (std of each group) or "global" (one std over the whole batch; the mean
           is always per group).
    A group whose rewards are all equal gets zeros (never NaN): it carries no signal.
    clip:  clip advantages to [-clip, clip] (Flow-GRPO uses 5).

    >>> grpo_advantages([1., 3., 5., 5.], group_size=2).round(3).tolist()   # (1-2)/(1+1e-4) ...
    [-1.0, 1.0, 0.0, 0.0]
    >>> grpo_advantages([0., 0., 0., 9.], group_size=4, std="sample").round(3).tolist()
    [-0.5, -0.5, -0.5, 1.5]
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, group_size)      # (num_groups, G)
    if std not in ("population", "sample") or scope not in ("group", "global"):
        raise ValueError("std must be 'population'|'sample' and scope 'group'|'global'")
    if std == "sample" and group_size < 2:
        raise ValueError("sample std needs group_size >= 2")
    ddof = 1 if std == "sample" else 0
    centred = r - r.mean(axis=1, keepdims=True)                           # (num_groups, G)
    if scope == "group":
        sd = r.std(axis=1, ddof=ddof, keepdims=True)                      # (num_groups, 1)
    else:
        sd = np.full((r.shape[0], 1), r.std(ddof=ddof) if r.size > ddof else 0.0)
    adv = centred / (sd + eps)
    adv[np.all(r == r[:, :1], axis=1)] = 0.0                              # all-equal -> zeros
    if clip is not None:
        adv = np.clip(adv, -clip, clip)
    return adv.reshape(-1)


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None,
                  averaging: str = "sequence"):
    """PPO clipped surrogate over token log-probs (GCPO's Eq. 4, no KL term).

        ratio_t = exp(logp_t - old_logp_t)
        l_t     = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps_high) * A)
        loss    = (1/B) sum_i (1/T_i) sum_t l_{i,t}        averaging="sequence" (the paper)
                = sum_{i,t} l_{i,t} / sum_i T_i             averaging="token" (DAPO-style)

    logp, old_logp, mask: (B, T); advantages: (B,). Returns (loss, stats) with stats:
    clip_frac (fraction of valid tokens whose ratio was clipped in the direction that
    matters), approx_kl (mean of (ratio - 1) - log ratio, k3 estimator, monitor only),
    ratio_mean.

    At ratio 1 the loss is the plain policy-gradient loss -mean_i A_i:
    >>> lp = torch.zeros(2, 3); m = torch.tensor([[1., 1., 0.], [1., 1., 1.]])
    >>> loss, st = ppo_clip_loss(lp, lp, torch.tensor([1.0, -3.0]), m)
    >>> round(loss.item(), 4), st["clip_frac"], st["approx_kl"]
    (1.0, 0.0, 0.0)
    """
    if averaging not in ("sequence", "token"):
        raise ValueError("averaging must be 'sequence' or 'token'")
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.to(device=logp.device, dtype=logp.dtype)
    old_logp = old_logp.to(logp.device)
    log_ratio = (logp - old_logp) * mask                                  # (B, T)
    ratio = torch.exp(log_ratio)                                          # (B, T)
    adv = advantages.to(device=logp.device, dtype=logp.dtype)[:, None]    # (B, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + hi) * adv
    per_token = -torch.minimum(unclipped, clipped) * mask                 # (B, T)
    if averaging == "sequence":
        per_seq = per_token.sum(1) / mask.sum(1).clamp(min=1.0)           # (B,)
        loss = per_seq.mean()
    else:
        loss = per_token.sum() / mask.sum().clamp(min=1.0)
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        clip_frac = (((clipped < unclipped).to(logp.dtype)) * mask).sum() / n
        approx_kl = (((ratio - 1.0) - log_ratio) * mask).sum() / n
        ratio_mean = (ratio * mask).sum() / n
    return loss, {"clip_frac": float(clip_frac), "approx_kl": float(approx_kl),
                  "ratio_mean": float(ratio_mean)}


def gedit_scores(sc_pair: list[float] | None, pq_pair: list[float] | None) -> dict:
    """GEdit-Bench-EN per-sample scores: SC = min(sc_a, sc_b), PQ = min(pq_a, pq_b),
    O = sqrt(SC * PQ). Missing judge answers give None (never a made-up number).

    >>> gedit_scores([8, 6], [9, 4])
    {'SC': 6.0, 'PQ': 4.0, 'O': 4.898979485566356}
    """
    sc = float(min(sc_pair)) if sc_pair else None
    pq = float(min(pq_pair)) if pq_pair else None
    o = math.sqrt(sc * pq) if sc is not None and pq is not None else None
    return {"SC": sc, "PQ": pq, "O": o}


# =========================================================================================
# E. Files: JSONL rows that survive interruption, images written atomically
# =========================================================================================
# Every stage reads and writes a run folder. Rules: a row is written with ONE os.write of
# a complete line (a kill cannot split it), PNGs go through a temp file + os.replace, and a
# reader names the file and line of anything malformed and says what to do.

class DataError(ValueError):
    """Bad input: the message names the file/row and what to do about it."""


def read_jsonl(path: str, required: tuple = ()) -> list[dict]:
    """Read a JSONL file; a malformed row or a row missing a required field raises
    DataError naming the file and line. A partial last line (an interrupted writer) is
    reported, not silently parsed.

    >>> import tempfile, os; d = tempfile.mkdtemp(); p = os.path.join(d, "x.jsonl")
    >>> _ = open(p, "w").write('{"a": 1}\\n{"b": 2}\\n')
    >>> read_jsonl(p, required=("a",))
    Traceback (most recent call last):
    ...
    common.DataError: ...x.jsonl line 2: missing field(s) ['a']; fix or delete that row
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found (did the previous stage run? see README)")
    rows = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for i, line in enumerate(f, 1):
            if any(0xDC80 <= ord(ch) <= 0xDCFF for ch in line):
                raise DataError(f"{path} line {i}: not UTF-8 text; re-encode the file as UTF-8")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                tail = " (an interrupted write? rerun the stage: it repairs the tail)" \
                    if not line.endswith("\n") else ""
                raise DataError(f"{path} line {i}: not valid JSON ({e.msg}){tail}; "
                                f"fix or delete that row") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {i}: expected a JSON object; fix or delete that row")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataError(f"{path} line {i}: missing field(s) {missing}; fix or delete that row")
            rows.append(row)
    return rows


def open_resumable_jsonl(path: str, key: str) -> tuple[set, int]:
    """Prepare `path` for appending and return (keys already written, rows dropped).

    A trailing partial line (the writer was killed mid-line on a filesystem that allows
    it) is cut off so the rerun rewrites that row; nothing else is touched.
    """
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(path, "w").close()
        return set(), 0
    with open(path, "rb") as f:
        data = f.read()
    keep = data[:data.rfind(b"\n") + 1]
    dropped = int(len(keep) != len(data))
    if dropped:
        with open(path, "wb") as f:
            f.write(keep)
    done = set()
    for i, line in enumerate(keep.decode("utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                done.add(json.loads(line)[key])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path} line {i}: not a JSON object with {key!r}; "
                                f"fix or delete that row") from None
    return done, dropped


def append_jsonl(path: str, rows: list[dict]) -> None:
    """Append complete rows with a single os.write, then fsync."""
    if not rows:
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The newest <ckpt_dir>/checkpoint-<step> folder, or None (for --resume_from_checkpoint latest)."""
    if not os.path.isdir(ckpt_dir):
        return None
    steps = sorted(int(d.split("-")[1]) for d in os.listdir(ckpt_dir) if d.startswith("checkpoint-"))
    return os.path.join(ckpt_dir, f"checkpoint-{steps[-1]}") if steps else None


def save_checkpoint(accelerator, ckpt_dir: str, step: int, keep: int) -> None:
    """accelerate save_state to <ckpt_dir>/checkpoint-<step>, keeping the newest `keep`."""
    import shutil
    accelerator.wait_for_everyone()
    accelerator.save_state(os.path.join(ckpt_dir, f"checkpoint-{step}"))
    if accelerator.is_main_process:
        old = sorted(int(d.split("-")[1]) for d in os.listdir(ckpt_dir) if d.startswith("checkpoint-"))
        for s in old[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, f"checkpoint-{s}"), ignore_errors=True)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write a JSON file via a temp file + os.replace (readers never see half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def write_jsonl_atomic(path: str, rows: list[dict]) -> None:
    """Write a whole JSONL file via a temp file + os.replace (for derived files rewritten whole)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def save_image_atomic(image, path: str) -> None:
    """Save a PIL image via a temp file + os.replace."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def load_image(path: str, where: str = ""):
    """Open an image as RGB; a missing or corrupt file raises DataError naming it."""
    from PIL import Image, UnidentifiedImageError
    ctx = f" ({where})" if where else ""
    if not os.path.exists(path):
        raise DataError(f"image not found: {path}{ctx}; check the path or remove the row")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"corrupt or unreadable image: {path}{ctx}: {e}; "
                        f"replace the file or remove the row") from None


# =========================================================================================
# F. VLM backends: one call shape for every role (decomposer, pool member, inspector, judge)
# =========================================================================================
# chat(requests, n, temperature, max_tokens) -> for each request, n texts (None = failed).
# A request is (messages, images) with images filling the {"type": "image"} slots in order.
#   mini:<member>        the mini world's simulated VLMs (miniworld.sim)
#   hf:<path>            a local Qwen2.5-VL checkpoint (generate + decode, see section G)
#   openai:<model>@<url> any OpenAI-compatible /v1/chat/completions endpoint (vLLM,
#                        `transformers serve`, a hosted API); key from $OPENAI_API_KEY
#                        (or the variable named by api_key_env), never logged.
# A failed call returns None for its texts and bumps a counter; no text is ever made up.

def image_data_url(image) -> str:
    """PNG data URL of a PIL image (what OpenAI-style endpoints accept)."""
    import base64
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def to_openai_messages(messages: list[dict], images: list) -> list[dict]:
    """Replace each {"type": "image"} slot by an image_url data URL, in order.

    >>> from PIL import Image
    >>> m = to_openai_messages(verify_messages("x", [], "compact"), [Image.new("RGB", (2, 2))] * 2)
    >>> [c["type"] for c in m[1]["content"]][:2], m[1]["content"][1]["image_url"]["url"][:22]
    (['text', 'image_url'], 'data:image/png;base64,')
    """
    n_slots = sum(c.get("type") == "image" for m in messages for c in m["content"])
    if n_slots != len(images):
        raise ValueError(f"{n_slots} image slots but {len(images)} images")
    it = iter(images)
    return [{"role": m["role"], "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(next(it))}}
        if c.get("type") == "image" else c for c in m["content"]]} for m in messages]


def openai_backend(model: str, url: str, api_key_env: str = "OPENAI_API_KEY",
                   timeout: float = 120.0, retries: int = 3, backoff: float = 1.0,
                   concurrency: int = 8, counters: dict | None = None, **_):
    """An OpenAI-compatible chat backend (stdlib HTTP; bounded concurrency; retries with
    exponential backoff on connection errors, timeouts, 429 and 5xx). Servers that ignore
    `n` (e.g. `transformers serve`) are asked again until n texts arrive. Keywords meant
    for other backends (`seed`, which build_data.py passes to every role) are ignored."""
    import time
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor
    counters = counters if counters is not None else {}
    endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/chat/completions")
                                  else "/chat/completions")
    key = os.environ.get(api_key_env, "")

    def post(body: dict) -> list[str | None]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(retries + 1):
            try:
                req = urllib.request.Request(endpoint, data=data, headers=headers)
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    payload = json.loads(resp.read())
                texts = [c["message"]["content"] for c in payload["choices"]]
                if not texts:
                    raise IndexError("no choices")  # an empty answer is a bad response too
                return [t if isinstance(t, str) else None for t in texts]
            except urllib.error.HTTPError as e:
                retry = e.code == 429 or e.code >= 500
                counters[f"http_{e.code}"] = counters.get(f"http_{e.code}", 0) + 1
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError):
                retry = True
                counters["connection_error"] = counters.get("connection_error", 0) + 1
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                retry = True  # garbage from the server: count it, try again
                counters["bad_response"] = counters.get("bad_response", 0) + 1
            if not retry or attempt == retries:
                break
            time.sleep(backoff * 2 ** attempt)
        counters["failed_calls"] = counters.get("failed_calls", 0) + 1
        return []

    def one(req, n, temperature, max_tokens) -> list[str | None]:
        messages, images = req
        body = {"model": model, "messages": to_openai_messages(messages, images),
                "temperature": temperature, "max_tokens": max_tokens, "n": n}
        texts: list[str | None] = []
        for _ in range(n):  # at most n round trips when the server ignores n
            got = post(body)
            if not got:
                break
            texts += got
            if len(texts) >= n:
                break
        return (texts + [None] * n)[:n]

    def chat(requests, n=1, temperature=0.0, max_tokens=512):
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(lambda r: one(r, n, temperature, max_tokens), requests))
    return chat


def make_backend(spec: str, counters: dict | None = None, **kw):
    """Build chat(requests, n, temperature, max_tokens) from 'mini:<member>',
    'hf:<path>' or 'openai:<model>@<url>'."""
    kind, _, rest = spec.partition(":")
    if kind == "openai":
        model, _, url = rest.partition("@")
        if not model or not url:
            raise ValueError(f"openai backend spec must be openai:<model>@<url>, got {spec!r}")
        return openai_backend(model, url, counters=counters, **kw)
    if kind == "mini":
        from miniworld import sim  # the environment, imported only when asked for
        return sim.make_chat(rest, **kw)
    if kind == "hf":
        return hf_backend(rest, **kw)
    raise ValueError(f"unknown backend {spec!r}: use mini:<member>, hf:<path> or openai:<model>@<url>")


# =========================================================================================
# G. The RRM as a model: load, batch two-image prompts, generate N and parse, log-probs
# =========================================================================================
# Shared by sft_rrm.py, gcpo.py, flow_grpo.py (in-process reward) and evaluate.py.
# Qwen2.5-VL facts this code relies on (measured, ../shared/notes/LIBRARY-FACTS.md):
#  - the processor returns mm_token_type_ids; a forward WITHOUT it silently falls back to
#    1-D positions, so we always pass it (zeros over completion tokens);
#  - pixel_values is one flat (sum_i t*h*w, C*p*p) tensor ordered image by image;
#  - a random or young model can sample <|image_pad|>, which breaks the next forward, so
#    vision special tokens are suppressed in generation.

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                 "<|video_pad|>")


def reset_rope_cache(model) -> None:
    """Forget Qwen2.5-VL's cached m-RoPE offsets (stale after generate or on a new batch),
    through a DDP (.module) or peft (.get_base_model()) wrapper if there is one."""
    m = getattr(model, "module", model)
    m = m.get_base_model() if hasattr(m, "get_base_model") else m
    m.model.rope_deltas = None


def load_rrm(path: str, dtype: torch.dtype | None = None):
    """(model, processor) from a local folder or hub id, through the Auto classes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32)
    return model, processor


def encode_prompts(processor, messages_list: list[list[dict]], images_list: list[list],
                   max_length: int | None = None):
    """Left-padded prompt batch: input_ids, attention_mask, mm_token_type_ids, pixel_values,
    image_grid_thw. A prompt longer than max_length raises (we never cut image tokens)."""
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
             for m in messages_list]
    images = [img for imgs in images_list for img in imgs]
    batch = processor(text=texts, images=images or None, return_tensors="pt", padding=True,
                      return_mm_token_type_ids=True)
    if max_length is not None:
        lengths = batch["attention_mask"].sum(1)
        if int(lengths.max()) > max_length:
            i = int(lengths.argmax())
            raise DataError(f"prompt {i} has {int(lengths[i])} tokens > max_length {max_length}; "
                            f"raise --max_length or use smaller images (prompts are never cut)")
    return batch


def select_rows(batch, rows: list[int]) -> dict:
    """The prompt batch restricted to (or repeated into) `rows`. pixel_values is flat over
    all images, so it is split per image by image_grid_thw and rebuilt row by row."""
    out = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if batch.get("pixel_values") is not None:
        per_image = batch["image_grid_thw"].prod(-1).tolist()             # patches per image
        k = len(per_image) // batch["input_ids"].shape[0]                 # images per row
        chunks = torch.split(batch["pixel_values"], per_image)
        out["pixel_values"] = torch.cat([chunks[r * k + j] for r in rows for j in range(k)])
        out["image_grid_thw"] = batch["image_grid_thw"].reshape(-1, k, 3)[rows].reshape(-1, 3)
    return out


def repeat_prompts(batch, n: int) -> dict:
    """Every prompt n times, prompt-major (rows 0..n-1 are prompt 0): the row order of
    generate(num_return_sequences=n)."""
    return select_rows(batch, [i for i in range(batch["input_ids"].shape[0]) for _ in range(n)])


def suppress_ids(model, processor) -> list[int]:
    """Token ids the RRM must never generate: vision placeholders, plus whatever the
    checkpoint's generation_config already suppresses (passing suppress_tokens to generate
    replaces that list, so we merge)."""
    tok = processor.tokenizer
    ids = {tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    ids |= set(getattr(model.generation_config, "suppress_tokens", None) or [])
    return sorted(i for i in ids if i is not None and i != tok.unk_token_id)


@torch.no_grad()
def generate_n(model, processor, batch, n: int = 1, temperature: float = 1.0,
               max_new_tokens: int = 256, top_p: float = 1.0, min_new_tokens: int = 0):
    """Sample n completions per prompt. Returns a dict with
    texts (list of B lists of n strings), completion_ids (B*n, T), completion_mask (B*n, T),
    old_logp (B*n, T): log-probs of the sampled tokens under softmax(logits / temperature),
    the same quantity completion_logprobs computes for the PPO ratio."""
    tok = processor.tokenizer
    do_sample = temperature > 0
    batch = to_device(batch, model)
    out = model.generate(
        **batch, do_sample=do_sample, num_return_sequences=n,
        temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
        top_k=0 if do_sample else None, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
        suppress_tokens=suppress_ids(model, processor), return_dict_in_generate=True,
        output_logits=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    reset_rope_cache(model)  # stale after generate; see LIBRARY-FACTS
    prompt_len = batch["input_ids"].shape[1]
    ids = out.sequences[:, prompt_len:]                                   # (B*n, T)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    # completion mask: tokens up to and including the first <|im_end|>
    is_eos = ids == eos
    after = (is_eos.cumsum(1) - is_eos.long()) > 0
    mask = (~after).long()
    logits = torch.stack(out.logits, 1).float()                          # (B*n, T, V)
    t = temperature if do_sample else 1.0
    old_logp = torch.log_softmax(logits / t, -1).gather(-1, ids[..., None])[..., 0] * mask
    texts = tok.batch_decode(ids * mask + tok.pad_token_id * (1 - mask), skip_special_tokens=True)
    B = batch["input_ids"].shape[0]
    return {"texts": [texts[i * n:(i + 1) * n] for i in range(B)], "completion_ids": ids,
            "completion_mask": mask, "old_logp": old_logp}


def to_device(batch, model) -> dict:
    """The batch's tensors on the model's device (processors return CPU tensors)."""
    dev = next(model.parameters()).device
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}


def _unwrap(model):
    m = getattr(model, "module", model)
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def prefill(model, prompts):
    """Run the vision tower and the prompt ONCE per prompt.

    Returns (logits of the last prompt token (B, V), the KV cache, the m-RoPE position of
    the first completion token (B,)). Text after the images advances all three m-RoPE axes
    together, so completion token t sits at next_pos + t on every axis."""
    prompts = to_device(prompts, model)
    pos, _ = _unwrap(model).model.get_rope_index(
        prompts["input_ids"], prompts["mm_token_type_ids"], image_grid_thw=prompts.get("image_grid_thw"),
        attention_mask=prompts["attention_mask"])                          # (3, B, L)
    reset_rope_cache(model)
    out = model(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"],
                mm_token_type_ids=prompts["mm_token_type_ids"], pixel_values=prompts.get("pixel_values"),
                image_grid_thw=prompts.get("image_grid_thw"), position_ids=pos, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.cache, pos.amax(dim=(0, 2)) + 1


def _positions(start: torch.Tensor, T: int) -> torch.Tensor:
    """(3, R, T) m-RoPE positions of T text tokens starting at start (R,)."""
    return (start[:, None] + torch.arange(T, device=start.device)).unsqueeze(0).expand(3, -1, -1)


@torch.no_grad()
def generate_shared(model, processor, prompts, n: int = 1, temperature: float = 1.0,
                    max_new_tokens: int = 256, min_new_tokens: int = 0, seeds: list[int] | None = None):
    """generate_n with prefix sharing: the vision tower and the prompt run once per prompt,
    the KV cache is copied to the n samples, then all B*n rows decode together.

    HF generate(num_return_sequences=n) expands the inputs first, so it re-encodes both
    images and re-reads the prompt n times. Sampling is plain temperature sampling (no
    top-k / top-p: RL needs the log-prob of the distribution actually sampled); T = 0 is
    greedy. seeds (one int per row, B*n): each row draws its tokens from its own generator
    (Gumbel-max), so a row's sample does not depend on which other rows share its batch --
    what makes rollouts identical on 1 or k processes. Returns the same dict as generate_n
    (texts, completion_ids, completion_mask, old_logp), rows prompt-major."""
    tok = processor.tokenizer
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    from transformers.cache_utils import StaticCache
    B, L = prompts["input_ids"].shape
    logits, cache, start = prefill(model, prompts)
    cache.batch_repeat_interleave(n)                                       # share the prefix
    # A preallocated cache of L + max_new_tokens positions, filled with the prompt's keys and
    # values: DynamicCache concatenates every layer's keys at every token (O(T^2) copying: 80%
    # of decode time on CPU in the mini run); StaticCache writes in place. Same answers.
    static = StaticCache(config=_unwrap(model).config, max_cache_len=L + max_new_tokens)
    for dyn, layer in zip(cache.layers, static.layers):
        layer.update(dyn.keys, dyn.values)
    cache = static
    logits, start = logits.repeat_interleave(n, 0), start.repeat_interleave(n)
    attn = prompts["attention_mask"].to(logits.device).repeat_interleave(n, 0)
    dev = logits.device
    blocked = torch.tensor(suppress_ids(_unwrap(model), processor), dtype=torch.long, device=dev)
    done = torch.zeros(B * n, dtype=torch.bool, device=dev)
    gens = None
    if seeds is not None and temperature > 0:
        assert len(seeds) == B * n, f"{len(seeds)} seeds for {B * n} rows"
        gens = [torch.Generator(device=dev).manual_seed(int(x)) for x in seeds]
    ids, logps = [], []
    for t in range(max_new_tokens):
        scaled = logits.float() / (temperature if temperature > 0 else 1.0)  # (B*n, V)
        logp = torch.log_softmax(scaled, -1)        # what completion_logprobs computes
        allowed = scaled.index_fill(1, blocked if t >= min_new_tokens else
                                    torch.cat([blocked, torch.tensor([eos], device=dev)]), float("-inf"))
        if temperature <= 0:
            nxt = allowed.argmax(-1)
        elif gens is None:
            nxt = torch.multinomial(torch.softmax(allowed, -1), 1)[:, 0]
        else:  # Gumbel-max: argmax(logits + G), G = -log(-log U), U from the row's own generator
            u = torch.stack([torch.rand(allowed.shape[1], generator=g, device=dev) for g in gens])
            nxt = (allowed - torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        ids.append(nxt)
        logps.append(logp.gather(1, nxt[:, None])[:, 0] * (~done))
        done = done | (nxt == eos)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=_positions(start + t, 1),
                    cache=cache, use_cache=True)
        logits = out.logits[:, -1]
    ids = torch.stack(ids, 1)                                              # (B*n, T)
    is_eos = ids == eos
    mask = (~((is_eos.cumsum(1) - is_eos.long()) > 0)).long()              # up to the first eos
    texts = tok.batch_decode(ids * mask + pad * (1 - mask), skip_special_tokens=True)
    return {"texts": [texts[i * n:(i + 1) * n] for i in range(B)], "completion_ids": ids,
            "completion_mask": mask, "old_logp": torch.stack(logps, 1) * mask}


def completion_logprobs_shared(model, prompts, prompt_index: list[int], completion_ids, completion_mask,
                               temperature: float = 1.0):
    """completion_logprobs with prefix sharing, exact: each unique prompt (vision tower
    included) is encoded once, its KV cache gathered for every completion row r that uses
    prompt prompt_index[r], and the completions run on top. Gradients flow through the
    gather back into the shared prompt pass. Returns (R, T) log-probs."""
    logits0, cache, start = prefill(model, prompts)
    idx = torch.tensor(prompt_index, dtype=torch.long, device=logits0.device)
    completion_ids, completion_mask = completion_ids.to(idx.device), completion_mask.to(idx.device)
    cache.batch_select_indices(idx)                                         # (R, ...) copies
    T = completion_ids.shape[1]
    attn = torch.cat([prompts["attention_mask"].to(idx.device)[idx], completion_mask], 1)
    out = model(input_ids=completion_ids, attention_mask=attn, position_ids=_positions(start[idx], T),
                cache=cache, use_cache=True)
    logits = torch.cat([logits0[idx][:, None], out.logits[:, :-1]], 1).float() / temperature  # (R, T, V)
    logp = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None])[..., 0]
    return logp * completion_mask


def completion_logprobs(model, prompts, completion_ids, completion_mask, temperature: float = 1.0):
    """Log-probs (B, T) of completion tokens given prompts (already repeated to B rows).

    One forward over [prompt ; completion]; mm_token_type_ids is extended with zeros over
    the completion so the 3-D (m-RoPE) positions stay right."""
    logits = completion_logits(model, prompts, completion_ids, completion_mask) / temperature  # (B, T, V)
    logp = torch.log_softmax(logits, -1).gather(-1, completion_ids.to(logits.device)[..., None])[..., 0]
    return logp * completion_mask.to(logits.device)


def completion_logits(model, prompts, completion_ids, completion_mask):
    """The float logits (B, T, V) that predict each completion token (completion_logprobs)."""
    prompts = to_device(prompts, model)
    completion_ids, completion_mask = completion_ids.to(prompts["input_ids"].device), completion_mask.to(prompts["input_ids"].device)
    ids = torch.cat([prompts["input_ids"], completion_ids], 1)           # (B, L+T)
    attn = torch.cat([prompts["attention_mask"], completion_mask], 1)
    mm = torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(completion_ids)], 1)
    reset_rope_cache(model)
    out = model(input_ids=ids, attention_mask=attn, mm_token_type_ids=mm,
                pixel_values=prompts.get("pixel_values"), image_grid_thw=prompts.get("image_grid_thw"),
                use_cache=False, logits_to_keep=completion_ids.shape[1] + 1)
    return out.logits[:, :-1].float()


# each <points> entry's verdict digit: {"question": 3, "score": 0}
POINT_VERDICT = re.compile(r'"score":\s*([01])\b')


def span_tokens(tokenizer, text: str, spans: list[tuple[int, int]]) -> list[int | None]:
    """For each character span of text, the index of the first token that overlaps it, in
    the tokenization tokenize_completions uses (None if no token does)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [next((j for j, (x, y) in enumerate(offsets) if x < b and a < y), None) for a, b in spans]


@torch.no_grad()
def verdict_probabilities(model, processor, requests, principles_list, texts: list[str],
                          variant: str = "compact", batch_size: int = 16) -> list[list[float] | None]:
    """Soft verdicts: for each answer text (the RRM's own, from rrm_score) the RRM's
    probability of "1" against "0" at each <points> verdict digit, the text teacher-forced
    after its prompt: p = e^l1 / (e^l1 + e^l0) with l the logits at that digit. One forward per
    answer, no sampling. None where the text does not hold one verdict digit per principle.
    aggregate_score(verdicts="probs") prices them (expected deductions)."""
    tok = processor.tokenizer
    one, zero = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("0")
    out = []
    for s in range(0, len(requests), batch_size):
        chunk, pr, tx = requests[s:s + batch_size], principles_list[s:s + batch_size], texts[s:s + batch_size]
        msgs = [verify_messages(ins, p, variant) for (_, _, ins), p in zip(chunk, pr)]
        prompts = encode_prompts(processor, msgs, [[src, ed] for src, ed, _ in chunk])
        ids, mask = tokenize_completions(processor, tx)
        logits = completion_logits(model, prompts, ids, mask)               # (B, T, V)
        for i, (t, p) in enumerate(zip(tx, pr)):
            spans = [m.span(1) for m in POINT_VERDICT.finditer(t)]
            pos = span_tokens(tok, t, spans)                                   # the token of each digit
            if len(spans) != len(p) or None in pos:
                out.append(None)
                continue
            two = logits[i, pos][:, [one, zero]]                              # (n, 2): "1", "0"
            out.append(torch.softmax(two, -1)[:, 0].tolist())
    return out


def tokenize_completions(processor, texts: list[str]):
    """SFT targets -> (completion_ids, completion_mask), right-padded, each ending in
    <|im_end|> (the end of the assistant turn)."""
    tok = processor.tokenizer
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
            for t in texts]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def rrm_score(model, processor, requests, principles_list, n: int = 1, temperature: float = 0.0,
              max_new_tokens: int = 256, batch_size: int = 8, variant: str = "compact"):
    """Generate-N-and-parse: the RRM's verdicts on (source, edited, instruction) requests.

    requests: list of (source_image, edited_image, instruction); principles_list aligned.
    Returns, per request, n parsed outputs (parse_rrm_output dicts with the raw text)."""
    results = []
    for s in range(0, len(requests), batch_size):
        chunk = requests[s:s + batch_size]
        pr = principles_list[s:s + batch_size]
        msgs = [verify_messages(ins, p, variant) for (_, _, ins), p in zip(chunk, pr)]
        batch = encode_prompts(processor, msgs, [[src, ed] for src, ed, _ in chunk])
        gen = generate_shared(model, processor, batch, n, temperature, max_new_tokens)
        for texts, p in zip(gen["texts"], pr):
            results.append([dict(parse_rrm_output(t, len(p)), text=t) for t in texts])
    return results


def pair_requests(pairs: list[dict]):
    """Preference rows {source, winner, loser, instruction, principles} -> the 2P scoring
    requests (winner of pair i at 2i, loser at 2i+1) and their principles."""
    reqs, prins = [], []
    for p in pairs:
        src = load_image(p["source"], p.get("id", ""))
        for k in ("winner", "loser"):
            reqs.append((src, load_image(p[k], p.get("id", "")), p["instruction"]))
            prins.append(p["principles"])
    return reqs, prins


def pairwise_accuracy(scores_w: list, scores_l: list) -> dict:
    """RRM accuracy on preference pairs (EditScore protocol): a pair counts only if the
    preferred edit scores STRICTLY higher; ties and unparseable scores count as wrong.

    >>> pairwise_accuracy([7, 5, None, 3], [6, 5, 2, None])
    {'accuracy': 0.25, 'ties': 0.25, 'unparsed_pairs': 0.5, 'pairs': 4}
    """
    n = len(scores_w)
    right = sum(1 for w, l in zip(scores_w, scores_l) if w is not None and l is not None and w > l)
    ties = sum(1 for w, l in zip(scores_w, scores_l) if w is not None and w == l)
    unparsed = sum(1 for w, l in zip(scores_w, scores_l) if w is None or l is None)
    return {"accuracy": right / max(n, 1), "ties": ties / max(n, 1), "unparsed_pairs": unparsed / max(n, 1), "pairs": n}


@torch.no_grad()
def evaluate_pairs(model, processor, pairs: list[dict], variant: str = "compact", max_new_tokens: int = 256,
                   batch_size: int = 64, n: int = 1, temperature: float = 0.0) -> dict:
    """Score both edits of every pair (mean of n samples if n > 1: "reasoning expansion")
    and return pairwise accuracy, parse rate and the mean score. Greedy by default.
    batch_size: requests per generate call (the tiny CPU model decodes 400 answers in
    ~26 s at 64, ~43 s at 16; on a GPU lower it if memory asks)."""
    was_training = model.training
    model.eval()
    reqs, prins = pair_requests(pairs)
    results = rrm_score(model, processor, reqs, prins, n=n, temperature=temperature,
                        max_new_tokens=max_new_tokens, batch_size=batch_size, variant=variant)
    model.train(was_training)
    scores = []
    for outs in results:
        ok = [o["score"] for o in outs if o["status"] == "ok"]
        scores.append(sum(ok) / len(ok) if ok else None)
    parsed = [o["status"] == "ok" for outs in results for o in outs]
    valid = [s for s in scores if s is not None]
    return {**pairwise_accuracy(scores[0::2], scores[1::2]), "parse_rate": sum(parsed) / max(len(parsed), 1),
            "mean_score": sum(valid) / max(len(valid), 1), "scores": scores}


def hf_backend(path: str, batch_size: int = 8, **_):
    """chat() over a local checkpoint (any role; the messages carry the role)."""
    model, processor = load_rrm(path)
    model.eval()

    def chat(requests, n=1, temperature=0.0, max_tokens=512):
        out = []
        for s in range(0, len(requests), batch_size):
            chunk = requests[s:s + batch_size]
            batch = encode_prompts(processor, [m for m, _ in chunk], [i for _, i in chunk])
            out += generate_shared(model, processor, batch, n, temperature, max_tokens)["texts"]
        return out
    return chat


# =========================================================================================
# H. Editing pipelines (FLUX.1-Kontext, Qwen-Image-Edit) called the way they must be called
# =========================================================================================
# Shared by build_data.py (candidate editors) and evaluate.py (editor evaluation); flow_grpo.py
# runs its own SDE loop over the same components.

def load_edit_pipeline(path: str, dtype: torch.dtype | None = None):
    """FluxKontextPipeline or QwenImageEditPipeline, whichever model_index.json names."""
    from diffusers import DiffusionPipeline
    return DiffusionPipeline.from_pretrained(path, dtype=dtype or torch.float32)


@contextlib.contextmanager
def qwen_edit_at_area(area: int):
    """Run QwenImageEditPipeline.__call__ at `area` pixels instead of ~1024 x 1024.

    Why: __call__ starts with `calculate_dimensions(1024 * 1024, width / height)` and resizes
    the condition image to that size for both the VAE (image latents: 4096 tokens at 1 MP)
    and the text encoder, whatever height/width are passed; no argument changes it (passing
    latents as `image` fails earlier, on `image.size`). We swap that module-level function for
    the duration of the block; nothing else of the pipeline changes. On GPUs at the real
    resolution, simply do not use this.

    Example:
        with qwen_edit_at_area(96 * 96):
            out = pipe(image=img, prompt_embeds=pe, prompt_embeds_mask=mask, height=96, width=96)
    """
    from diffusers import QwenImageEditPipeline
    module = sys.modules[QwenImageEditPipeline.__module__]
    original = module.calculate_dimensions
    module.calculate_dimensions = lambda _target_area, ratio: original(area, ratio)
    try:
        yield
    finally:
        module.calculate_dimensions = original


def qwen_edit_prompt_embeds(pipe, prompt: str | list[str], image) -> tuple:
    """Qwen-Image-Edit's prompt embeddings with multimodal positions.

    Same recipe as QwenImageEditPipeline._get_qwen_prompt_embeds -- wrap the instruction in the
    pipeline's template, run the Qwen2.5-VL text encoder over [template, image, instruction],
    take the last hidden states, drop the system prefix, pad to the longest -- except that the
    processor's `mm_token_type_ids` are passed on. Without them (the pipeline's call, under
    transformers 5.x) the encoder cannot build its 3-D M-RoPE positions and falls back to 1-D
    positions 0..L-1, which is not how Qwen2.5-VL reads images (an open upstream bug).
    The dropped prefix is counted with the pipeline's tokenizer, not assumed to be 64.

    image: the PIL image(s) the pipeline would give its encoder: one per prompt (inside
    qwen_edit_at_area a 96 px image is passed unchanged). Returns (prompt_embeds (B, L, D),
    prompt_embeds_mask (B, L)), to pass to pipe(prompt_embeds=..., prompt_embeds_mask=...).
    Gradients flow (for training the encoder); wrap the call in torch.no_grad() otherwise.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    template = pipe.prompt_template_encode
    drop = len(pipe.tokenizer(template.split("<|vision_start|>")[0]).input_ids)
    inputs = pipe.processor(text=[template.format(p) for p in prompts], images=image, padding=True,
                            return_tensors="pt").to(pipe.text_encoder.device)
    out = pipe.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                            mm_token_type_ids=inputs["mm_token_type_ids"],  # the missing argument
                            output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states[-1]                                          # (B, T, D)
    keep = inputs["attention_mask"].bool()
    rows = [h[m][drop:] for h, m in zip(hidden, keep)]                      # B x (L_b, D)
    length = max(r.shape[0] for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], r.shape[1])]) for r in rows])
    mask = torch.stack([torch.arange(length, device=hidden.device) < r.shape[0] for r in rows]).long()
    return embeds.to(pipe.text_encoder.dtype), mask                         # (B, L, D), (B, L)


@torch.no_grad()
def pipeline_edit(pipe, images: list, instructions: list[str], seed: int | list[int] = 0, steps: int = 28,
                  size: int | None = None, guidance_scale: float = 2.5, true_cfg_scale: float = 4.0,
                  max_sequence_length: int = 512) -> list:
    """Edit a batch with a diffusers editing pipeline; returns PIL images. seed: one int for
    the batch, or one per image (a generator each: an image's edit then does not depend on
    which other images share its batch).

    Kontext: guidance-distilled (one pass, `guidance_scale` goes into the guidance
    embedding); we stop its ~1 MP auto-resize (max_area, _auto_resize=False) so the output
    has the source's size (or `size`). Qwen-Image-Edit: true classifier-free guidance
    (`true_cfg_scale`, two passes, negative prompt " "); prompt embeddings computed with
    multimodal positions (qwen_edit_prompt_embeds), and the condition image kept at the
    output area instead of the pipeline's fixed ~1024 x 1024."""
    h = w = size or images[0].size[1]
    if size is None:
        h, w = images[0].size[1], images[0].size[0]
    h, w = h // 16 * 16, w // 16 * 16
    gen = ([torch.Generator().manual_seed(int(x)) for x in seed] if isinstance(seed, (list, tuple))
           else torch.Generator().manual_seed(seed))
    kw = dict(image=images, height=h, width=w, num_inference_steps=steps, generator=gen)
    if type(pipe).__name__.startswith("FluxKontext"):
        return pipe(prompt=instructions, max_area=h * w, _auto_resize=False, guidance_scale=guidance_scale,
                    max_sequence_length=max_sequence_length, **kw).images
    if type(pipe).__name__.startswith("QwenImageEdit"):
        with qwen_edit_at_area(h * w):
            pe, mask = qwen_edit_prompt_embeds(pipe, instructions, images)
            if true_cfg_scale > 1:
                npe, nmask = qwen_edit_prompt_embeds(pipe, [" "] * len(images), images)
                kw.update(negative_prompt_embeds=npe, negative_prompt_embeds_mask=nmask)
            return pipe(prompt_embeds=pe, prompt_embeds_mask=mask, true_cfg_scale=true_cfg_scale, **kw).images
    raise ValueError(f"unsupported editing pipeline {type(pipe).__name__}")
