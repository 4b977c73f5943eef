"""sft_rrm.py -- Cold-start SFT of the reasoning reward model (paper Sec. 3.2): a Qwen2.5-VL model learns to write reasoning, per-principle 0/1 verdicts, the average and a final <score> from the selected trajectories.

Not implemented yet (issue 5): this stub only parses its arguments.
"""
from dataclasses import dataclass, field

from transformers import HfArgumentParser


@dataclass
class Args:
    run_dir: str = field(default="runs/mini", metadata={"help": "run folder that stages hand over through"})
    seed: int = field(default=0, metadata={"help": "random seed"})


def main(args: Args) -> None:
    raise SystemExit("sft_rrm.py: not implemented yet (see issue 5); only --help works.")


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
