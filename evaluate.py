"""evaluate.py -- Evaluation (paper Sec. 4): RRM pairwise accuracy (mini world, JSONL pairs, EditReward-Bench) and GEdit-Bench-style SC/PQ/O of editing models, written to a report folder.

Not implemented yet (issue 8): this stub only parses its arguments.
"""
from dataclasses import dataclass, field

from transformers import HfArgumentParser


@dataclass
class Args:
    run_dir: str = field(default="runs/mini", metadata={"help": "run folder that stages hand over through"})
    seed: int = field(default=0, metadata={"help": "random seed"})


def main(args: Args) -> None:
    raise SystemExit("evaluate.py: not implemented yet (see issue 8); only --help works.")


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
