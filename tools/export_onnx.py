#!/usr/bin/env python3
"""Thin wrapper around ``perception-export`` (same flags): python tools/export_onnx.py --model DIR --out FILE.onnx"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perception.export.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
