"""build_data.py -- Cold-start data construction (paper Sec. 3.2): decompose instructions into principles, generate candidate edits with several editors, score them with a VLM pool (CoT trajectories), re-verify every principle with an inspector, keep the best-verified trajectory per sample; also writes preference pairs.

Not implemented yet (issue 4): this stub only parses its arguments.
"""
from dataclasses import dataclass, field

from transformers import HfArgumentParser


@dataclass
class Args:
    run_dir: str = field(default="runs/mini", metadata={"help": "run folder that stages hand over through"})
    seed: int = field(default=0, metadata={"help": "random seed"})


def main(args: Args) -> None:
    raise SystemExit("build_data.py: not implemented yet (see issue 4); only --help works.")


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
