#!/usr/bin/env python3
"""Build a TensorRT engine for a SegNet model folder or exported ONNX, with our unpooling plugins.

    python tools/build_engine.py --model models/segnet_basic_camvid --out segnet_basic.engine --precision fp16
    python tools/build_engine.py --emit-ptx ptx/ --arch sm_90          # Triton kernels as PTX, no GPU needed

On a machine without TensorRT or a GPU it exports the ONNX (beside --out) and the PTX, checks them,
then exits with status 3 and one line saying what is missing. See docs/tensorrt.md.
"""

import sys

from perception.export.tensorrt.builder import main

if __name__ == "__main__":
    sys.exit(main())
