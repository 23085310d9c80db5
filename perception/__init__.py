"""SegNet Perception: train, export and stream SegNet semantic segmentation.

Importing this package loads only CPU dependencies; TensorRT, pycuda and Triton are imported by the
functions that need them.
"""

__version__ = "0.1.0"
