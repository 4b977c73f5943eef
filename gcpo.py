"""gcpo.py -- Group Contrastive Preference Optimization (paper Sec. 3.3, Eq. 2-4): the RRM is the policy; for each human preference pair it samples N trajectories per image, rewards each by its win/loss ratio against the other group, centres within the group and takes a PPO-clipped step (no KL).

Not implemented yet (issue 6): this stub only parses its arguments.
"""
from dataclasses import dataclass, field

from transformers import HfArgumentParser


@dataclass
class Args:
    run_dir: str = field(default="runs/mini", metadata={"help": "run folder that stages hand over through"})
    seed: int = field(default=0, metadata={"help": "random seed"})


def main(args: Args) -> None:
    raise SystemExit("gcpo.py: not implemented yet (see issue 6); only --help works.")


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
