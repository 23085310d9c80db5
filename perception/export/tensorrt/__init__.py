"""TensorRT engines: the builder, the plugins and their Triton kernels (nothing here imports TensorRT at import)."""

# The extras name the CUDA major: the bare `tensorrt` package requires the CUDA 13 build since 10.14.
TENSORRT_INSTALL = "pip install 'segnet-perception[tensorrt-cu12]' (CUDA 12 driver) or '[tensorrt-cu13]' (CUDA 13)"
