"""SegNet Perception: train, export and stream SegNet semantic segmentation.

Importing this package loads only CPU dependencies; TensorRT, pycuda and Triton are imported by the
functions that need them.
"""

__version__ = "0.1.0"

__all__ = ["Segmenter", "Segmentation", "__version__"]


def __getattr__(name: str):
    """``from perception import Segmenter`` imports the API on first use (``import perception`` stays light)."""
    if name in ("Segmenter", "Segmentation"):
        from perception import api

        return getattr(api, name)
    raise AttributeError(f"module 'perception' has no attribute {name!r}")
