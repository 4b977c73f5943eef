"""miniworld -- the synthetic image-editing world of edit-r1 (an environment, not the method).

  world.py  scenes, render / perceive, instructions, principles, ground truth, utility, splits
  sim.py    simulated editors, VLM pool, inspector, decomposer, judges, human rater
  bases.py  tiny randomly initialised "hub checkpoints" built with the real model classes

The stage scripts touch the world only through the interfaces real data uses (PIL images,
instruction strings, principle lists, chat calls (messages, images) -> text); see the
docstrings of world.py and sim.py. The names below are the whole public API.
"""
from miniworld.world import (DEFAULT, EDIT_CATEGORIES, SPLITS, Obj, Scene, WorldConfig,
                             add_noise, describe, ground_truth, is_noisy, make_config,
                             noise_level, perceive, principles_for, render, sample_context,
                             sample_contexts, split_of, utility)
from miniworld.sim import (EDITORS, MEMBERS, POOL, ROLES, decomposer, edit, inspector, judge,
                           make_chat, prefer, save_grid, simulate_chat, text_corpus, verifier)
