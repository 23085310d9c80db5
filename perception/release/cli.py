"""``perception-ship``: ship a trained run as a model folder, and its int8 graph.

    perception-ship model runs/NAME/final models/NAME --data ../shared/camvid --split train+val --groups 0006R0
    perception-ship int8 models/NAME --data ../shared/camvid --groups 0006R0 [--twin models/NAME/heldout_0006R0]

``model`` re-measures the run (fp32, native resolution) and writes weights, ``model.json`` and README.md;
``int8`` calibrates on the drives the model trained on, measures the int8 graph on the held-out drive and
records it beside fp32's, which is what ``--precision auto`` decides on.
"""

from __future__ import annotations

import argparse
import json
import sys

from perception.core.cli import fail
from perception.core.options import add_arguments, given, merge, validate

__all__ = ["build_parser", "main"]


def _commands():
    from perception.release.int8 import ShipInt8Options
    from perception.release.ship import ShipModelOptions

    return {"model": ShipModelOptions, "int8": ShipInt8Options}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception-ship", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{model,int8}")
    for name, cls in _commands().items():
        add_arguments(sub.add_parser(name, help=cls.__doc__.split(" (")[0], description=cls.__doc__), cls)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    cls = _commands()[ns.command]
    try:
        opts = validate(merge(cls, given(ns, cls)))
    except ValueError as e:
        return fail("perception-ship", str(e))
    try:
        if ns.command == "model":
            from perception.release.ship import ship_model

            print(json.dumps(ship_model(opts), indent=2))
        else:
            from perception.release.int8 import ship_int8_folders

            ship_int8_folders(opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (FileNotFoundError, ValueError, OSError) as e:
        return fail("perception-ship", str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
