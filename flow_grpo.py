"""flow_grpo.py -- Flow-GRPO of an editing model with the RRM as reward (paper Sec. 3.4): SDE sampling with per-step log-probs, G edits per context scored by the RRM, group-normalised advantages, clipped objective with KL to the reference (beta=0.04), LoRA.

Not implemented yet (issue 7): this stub only parses its arguments.
"""
from dataclasses import dataclass, field

from transformers import HfArgumentParser


@dataclass
class Args:
    run_dir: str = field(default="runs/mini", metadata={"help": "run folder that stages hand over through"})
    seed: int = field(default=0, metadata={"help": "random seed"})


def main(args: Args) -> None:
    raise SystemExit("flow_grpo.py: not implemented yet (see issue 7); only --help works.")


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
