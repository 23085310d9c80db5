#!/usr/bin/env python3
"""Ship a trained model folder into models/<name>/ with re-measured metrics and its README card: the same
as ``perception-ship model`` (perception/release/ship.py does the work).

    python tools/ship_model.py runs/segnet_basic_camvid/final models/segnet_basic_camvid --data ../shared/camvid
"""

import sys

from perception.release.cli import main

if __name__ == "__main__":
    sys.exit(main(["model", *sys.argv[1:]]))
