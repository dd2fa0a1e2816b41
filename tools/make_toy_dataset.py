"""Write the built-in toy dataset (VOC layout) to a folder.

    python -m tools.make_toy_dataset --out DIR [--num-train N] [--num-val N] [--size S] [--seed S]

Defaults come from the ``toy`` section of the config schema. A folder that already holds exactly this set is left as is.
"""

import argparse
import logging
import sys

from data.toy import make_toy_dataset
from sp_cam.config import ToyConfig


def main(argv: list[str] | None = None) -> int:
    defaults = ToyConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=str, required=True, help="output folder (created; must not hold other data)")
    parser.add_argument("--num-train", type=int, default=defaults.num_train)
    parser.add_argument("--num-val", type=int, default=defaults.num_val)
    parser.add_argument("--size", type=int, default=defaults.image_size, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = make_toy_dataset(args.out, args.num_train, args.num_val, args.size, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
