#!/usr/bin/env python3
"""Ship a model folder's int8 graph (model_int8.onnx) with its held-out mIoU in the card: the same as
``perception-ship int8`` (perception/release/int8.py does the work).

    python tools/ship_int8.py models/segnet_basic_camvid --data ../shared/camvid --groups 0006R0 \
        --twin models/segnet_basic_camvid/heldout_0006R0
"""

import sys

from perception.release.cli import main

if __name__ == "__main__":
    sys.exit(main(["int8", *sys.argv[1:]]))
