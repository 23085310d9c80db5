#!/usr/bin/env python3
"""Thin wrapper around ``perception-export`` (same flags): python tools/export_onnx.py --model DIR --out FILE.onnx"""

import sys

from perception.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
