"""Command-line checks of the checkpoint layouts this package reads.

    python -m liveavatar_core.checkpoints expected-keys dit

prints one `key<TAB>shape` line per tensor that the real Wan2.2-S2V-14B checkpoint must
hold, from our model built at full size on the meta device (no memory is allocated).
"""

from __future__ import annotations

import argparse
import sys

from .dit import S2VConfig, WanS2VTransformer
from .weights import build_empty


def dit_expected_shapes(config: S2VConfig | None = None) -> dict[str, tuple[int, ...]]:
    model = build_empty(lambda: WanS2VTransformer(config or S2VConfig()))
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


NETWORKS = {"dit": dit_expected_shapes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m liveavatar_core.checkpoints",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    keys = sub.add_parser("expected-keys", help="tensor names and shapes of a real checkpoint")
    keys.add_argument("network", choices=sorted(NETWORKS))
    args = parser.parse_args(argv)
    for name, shape in NETWORKS[args.network]().items():
        sys.stdout.write(f"{name}\t{shape}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
