"""python -m training [--model-repository DIR]: train every example model."""

import argparse
import logging
from pathlib import Path

from training.examples import train_examples


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train_examples(args.model_repository)
    return 0


raise SystemExit(main())
