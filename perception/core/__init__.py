"""Torch-free core: model card and input spec, classes and palettes, sizes, file helpers, CLI helpers."""
