"""Augmentations (numpy/OpenCV, per sample) and normalisation (torch, per batch).

Samples stay uint8 until they are batched; :func:`normalize` turns a uint8 NCHW batch into the model's
float input using the :class:`~perception.models.io.InputSpec` stored with the model, so training,
evaluation and export agree on preprocessing.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor

from perception.core.card import InputSpec

__all__ = ["TrainAugment", "ToTensors", "normalize", "to_tensors"]


def to_tensors(img: np.ndarray, lab: np.ndarray) -> tuple[Tensor, Tensor]:
    """HxWx3 uint8, HxW uint8 -> 3xHxW uint8 tensor, HxW int64 tensor."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), torch.from_numpy(lab.astype(np.int64))


class ToTensors:
    """No augmentation (evaluation)."""

    def __call__(self, img: np.ndarray, lab: np.ndarray) -> tuple[Tensor, Tensor]:
        return to_tensors(img, lab)


class TrainAugment:
    """Random scale jitter, random crop (padding with ``ignore_index`` where the scaled image is smaller),
    horizontal flip, photometric jitter (brightness, contrast, saturation), and the changes of light and
    sensor that separate one drive from another: gamma (dusk), hue, blur and noise.

    Each change draws random numbers only when it is enabled, so adding an option leaves the random
    stream (and a resumed run) of configurations without it unchanged.

    ``rng`` is a numpy Generator; the training loop re-seeds it per epoch so resumed runs replay the
    same augmentations.
    """

    def __init__(
        self,
        *,
        crop: tuple[int, int] | None,
        scale: tuple[float, float] = (1.0, 1.0),
        hflip: bool = True,
        color_jitter: float = 0.0,
        gamma: tuple[float, float] = (1.0, 1.0),
        hue: float = 0.0,
        blur: float = 0.0,
        noise: float = 0.0,
        ignore_index: int = 255,
        seed: int = 0,
    ) -> None:
        if scale[0] <= 0 or scale[0] > scale[1]:
            raise ValueError(f"bad scale range {scale}")
        if gamma[0] <= 0 or gamma[0] > gamma[1]:
            raise ValueError(f"bad gamma range {gamma}")
        self.crop, self.scale, self.hflip = crop, tuple(scale), hflip
        self.color_jitter, self.ignore_index = color_jitter, ignore_index
        self.gamma, self.hue, self.blur, self.noise = tuple(gamma), hue, blur, noise
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, img: np.ndarray, lab: np.ndarray) -> tuple[Tensor, Tensor]:
        rng = self.rng
        if self.scale != (1.0, 1.0):
            s = float(np.exp(rng.uniform(np.log(self.scale[0]), np.log(self.scale[1]))))
            h, w = lab.shape
            size = (max(1, round(w * s)), max(1, round(h * s)))
            img = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
            lab = cv2.resize(lab, size, interpolation=cv2.INTER_NEAREST)
        if self.crop is not None:
            ch, cw = self.crop
            h, w = lab.shape
            ph, pw = max(0, ch - h), max(0, cw - w)
            if ph or pw:
                img = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(0, 0, 0))
                lab = cv2.copyMakeBorder(lab, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=self.ignore_index)
                h, w = lab.shape
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            img, lab = img[y : y + ch, x : x + cw], lab[y : y + ch, x : x + cw]
        if self.hflip and rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        if self.color_jitter > 0:
            img = self._jitter(img, rng)
        if self.gamma != (1.0, 1.0):
            g = float(np.exp(rng.uniform(np.log(self.gamma[0]), np.log(self.gamma[1]))))
            lut = np.clip(255.0 * (np.arange(256) / 255.0) ** g + 0.5, 0, 255).astype(np.uint8)
            img = cv2.LUT(np.ascontiguousarray(img), lut)
        if self.hue > 0:
            shift = int(round(rng.uniform(-self.hue, self.hue) / 2))  # OpenCV hue is 0-179 (2 degrees a step)
            if shift:
                hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV)
                hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
                img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if self.blur > 0 and rng.random() < self.blur:
            img = cv2.GaussianBlur(np.ascontiguousarray(img), (0, 0), float(rng.uniform(0.3, 1.5)))
        if self.noise > 0:
            std = float(rng.uniform(0, self.noise))
            noisy = img.astype(np.float32) + rng.standard_normal(img.shape, dtype=np.float32) * std
            img = np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
        return to_tensors(img, lab)

    def _jitter(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        j = self.color_jitter
        f = img.astype(np.float32)
        brightness = rng.uniform(1 - j, 1 + j)
        contrast = rng.uniform(1 - j, 1 + j)
        saturation = rng.uniform(1 - j, 1 + j)
        f = f * brightness
        grey_mean = f.mean()
        f = (f - grey_mean) * contrast + grey_mean
        grey = f @ np.float32([0.299, 0.587, 0.114])
        f = (f - grey[..., None]) * saturation + grey[..., None]
        return np.clip(f, 0, 255).astype(np.uint8)


def normalization_stats(spec: InputSpec, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """``spec``'s mean and std as (1, C, 1, 1) float32 tensors on ``device``, in the scale of uint8 pixels."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1) / spec.scale
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1) / spec.scale
    return mean.to(device), std.to(device)


def normalize(batch: Tensor, spec: InputSpec, *, stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """uint8 (N, 3, H, W) in the dataset's RGB order -> float model input as ``spec`` says. ``stats``:
    :func:`normalization_stats` made once on the batch's device (a CUDA graph may not copy from the host)."""
    x = batch.float()
    if spec.color_order == "BGR":
        x = x.flip(1)
    mean, std = stats if stats is not None else normalization_stats(spec, x.device)
    return (x - mean) / std
