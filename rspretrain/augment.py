"""Decode, random-resized crop, flip and normalise: in the loader workers on the CPU, or batched on the device.

Every path draws a sample's crop the same way, from the sample's own RNG: the box as torchvision's
RandomResizedCrop, then the flip (`draw_crop`). What differs is where the pixels are made:

- ``augment``: the worker decodes, crops, flips, and normalises to float32. The path before uint8 batches,
  kept as the reference the others are tested against, and for in-memory callers.
- ``crop_uint8`` (``data.decode: cpu``, the default): the worker decodes, crops and flips with Pillow, exactly
  as ``augment``, and hands out uint8; ``normalize`` turns the batch into float on the device, inside the
  training step. The same images within float rounding, at about half the worker's CPU time per sample.
- ``data.decode: device``: the worker reads only the JPEG header (for the size the crop is drawn from) and
  passes the bytes and the crop (`EncodedBatch`); the training process decodes the batch with
  ``torchvision.io.decode_jpeg`` (nvjpeg on CUDA) and `resized_crops` resamples every crop of the batch in
  two batched matrix products with Pillow's bicubic filter (antialiased as Pillow's, rounded after each
  pass as Pillow's), the flip folded into the weights. Samples that are not baseline RGB/grey JPEGs (PNG,
  CMYK) are decoded in the worker and travel as pixels.

Shapes: N batch, C channels, H/W pixels, S output side.
"""

from __future__ import annotations

import functools
import io
import math
import random
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from rscurate.sample import IMAGE_MEMBER_SELECTOR

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_MEMBERS = tuple(IMAGE_MEMBER_SELECTOR.split(";"))
RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of RandomResizedCrop (torchvision's default)
JPEG_MODES = ("RGB", "L")  # JPEGs the device decoder takes; others are decoded in the worker
_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point coefficients for 8-bit images (Resample.c)
_BICUBIC_A = -0.5  # Pillow's bicubic kernel (Keys, a = -0.5); support 2


class Crop(NamedTuple):
    top: int
    left: int
    height: int
    width: int
    flip: bool


# --------------------------------------------------------------------------- decode (CPU)


def image_member(sample: dict[str, Any]) -> tuple[str, bytes]:
    """(extension, bytes) of the sample's image member, in rscurate.sample.IMAGE_MEMBER_SELECTOR order."""
    for member in IMAGE_MEMBERS:
        if member in sample:
            return member, sample[member]
    raise ValueError(f"sample has no {IMAGE_MEMBER_SELECTOR} member")


def decode_rgb(sample: dict[str, Any]) -> Image.Image:
    """The sample's image member as 8-bit RGB."""
    _, data = image_member(sample)
    img = Image.open(io.BytesIO(data))
    img.load()  # decodes, and drops the file object: the image owns its pixels
    # convert() would copy an RGB image whole (about 5% of a 512 px sample's decode and augment).
    return img if img.mode == "RGB" else img.convert("RGB")


# --------------------------------------------------------------------------- crop parameters


def random_resized_crop_box(
    width: int, height: int, rng: random.Random, scale: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params, drawing from `rng`."""
    area = width * height
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: central crop at the nearest allowed aspect ratio
    if in_ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif in_ratio > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_crop(width: int, height: int, rng: random.Random, scale: tuple[float, float]) -> Crop:
    """The box, then the horizontal flip (p = 0.5), in the order RandomResizedCrop + RandomHorizontalFlip draw."""
    top, left, h, w = random_resized_crop_box(width, height, rng, scale)
    return Crop(top, left, h, w, rng.random() < 0.5)


# --------------------------------------------------------------------------- crop on the CPU (workers)


def augment(img: Image.Image, rng: random.Random, img_size: int, scale: tuple[float, float]) -> Tensor:
    """RandomResizedCrop (bicubic) + horizontal flip + ImageNet normalisation: PIL (W, H) -> (C, S, S) float32.

    The worker's float path as it was before uint8 batches, through torchvision's functional transforms."""
    crop = draw_crop(img.width, img.height, rng, scale)
    img = TF.resized_crop(img, crop.top, crop.left, crop.height, crop.width, [img_size, img_size],
                          InterpolationMode.BICUBIC)  # fmt: skip
    if crop.flip:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


def crop_uint8(img: Image.Image, crop: Crop, img_size: int) -> np.ndarray:
    """The same crop and flip as `augment`, left as pixels: PIL (W, H) -> (S, S, C) uint8.

    Pillow called directly: the very operations torchvision's resized_crop and hflip run on a PIL image,
    without their per-call checks."""
    box = (crop.left, crop.top, crop.left + crop.width, crop.top + crop.height)
    out = img.crop(box).resize((img_size, img_size), Image.Resampling.BICUBIC)
    if crop.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


# --------------------------------------------------------------------------- normalise (device)


@functools.lru_cache(maxsize=16)
def _affine(device: torch.device, channels: int) -> tuple[Tensor, Tensor]:
    """Per-channel scale and shift with (x / 255 - mean) / std == x * scale + shift, each (1, C, 1, 1)."""
    if channels != len(IMAGENET_MEAN):
        raise ValueError(f"ImageNet normalisation needs {len(IMAGENET_MEAN)} channels, got {channels}")
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
    scale = (1.0 / (255.0 * std)).float().view(1, channels, 1, 1)
    shift = (-mean / std).float().view(1, channels, 1, 1)
    return scale.to(device), shift.to(device)


def normalize(images: Tensor) -> Tensor:
    """uint8 (N, C, H, W) pixels -> float32 ImageNet-normalised, contiguous; float input is returned as it is
    (already normalised: in-memory sources)."""
    if images.dtype != torch.uint8:
        return images
    scale, shift = _affine(images.device, images.shape[1])
    x = images.to(dtype=torch.float32, memory_format=torch.contiguous_format)  # (N, C, H, W)
    return x.mul_(scale).add_(shift)


# --------------------------------------------------------------------------- decode and crop on the device


@dataclass
class EncodedBatch:
    """What a worker hands out with ``data.decode: device``: per sample its encoded JPEG, or (formats the device
    decoder does not take) its decoded pixels, and its crop. One flat byte buffer, so a batch crosses from the
    worker process as a few tensors, not one per sample."""

    data: Tensor  # (B,) uint8: the samples' bytes back to back
    offsets: Tensor  # (N + 1,) int64: sample i is data[offsets[i]:offsets[i + 1]]
    pixels: Tensor  # (N,) bool: True where the bytes are (H, W, C) uint8 pixels, not a JPEG
    shapes: Tensor  # (N, 2) int64: image height, width
    crops: Tensor  # (N, 5) int64: top, left, height, width, flip
    size: int  # output side S

    def __len__(self) -> int:
        return int(self.crops.shape[0])

    @classmethod
    def build(cls, items: list[tuple[bytes | np.ndarray, int, int, Crop]], size: int) -> EncodedBatch:
        """items: (JPEG bytes, or (H, W, C) uint8 pixels; height; width; crop) per sample."""
        blobs = [np.frombuffer(x, np.uint8) if isinstance(x, bytes) else x.reshape(-1) for x, *_ in items]
        lengths = np.fromiter((len(b) for b in blobs), np.int64, len(blobs))
        return cls(
            data=torch.from_numpy(np.concatenate(blobs) if blobs else np.empty(0, np.uint8)),
            offsets=torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])),
            pixels=torch.tensor([not isinstance(x, bytes) for x, *_ in items], dtype=torch.bool),
            shapes=torch.tensor([[h, w] for _, h, w, _ in items], dtype=torch.int64).view(-1, 2),
            crops=torch.tensor([list(c) for *_, c in items], dtype=torch.int64).view(-1, 5),
            size=size,
        )


def jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG the device decoder takes (RGB or greyscale), from its header alone;
    None for any other image. Raises on bytes no image reader recognises."""
    img = Image.open(io.BytesIO(data))  # reads the header only
    if img.format != "JPEG" or img.mode not in JPEG_MODES:
        return None
    return img.height, img.width


def decode_batch(batch: EncodedBatch, device: torch.device) -> tuple[Tensor, list[int]]:
    """Decode and crop a batch on `device`: -> ((M, C, S, S) uint8, indices of the N - M samples dropped
    because their JPEG would not decode)."""
    n = len(batch)
    offsets, shapes, is_pixels = batch.offsets.tolist(), batch.shapes.tolist(), batch.pixels.tolist()
    images: list[Tensor | None] = [None] * n  # (C, H, W) uint8 on device
    for i in range(n):
        if is_pixels[i]:
            h, w = shapes[i]
            hwc = batch.data[offsets[i] : offsets[i + 1]].view(h, w, -1)  # (H, W, C)
            images[i] = hwc.to(device, non_blocking=True).permute(2, 0, 1)
    jpegs = [i for i in range(n) if not is_pixels[i]]
    if jpegs:
        blobs = [batch.data[offsets[i] : offsets[i + 1]] for i in jpegs]
        for i, img in zip(jpegs, _decode_jpegs(blobs, device), strict=True):
            images[i] = img
    kept = [i for i in range(n) if images[i] is not None]
    decoded = [img for img in images if img is not None]
    dropped = [i for i in range(n) if images[i] is None]
    if not decoded:
        return torch.empty(0, 3, batch.size, batch.size, dtype=torch.uint8, device=device), dropped
    hmax, wmax = max(shapes[i][0] for i in kept), max(shapes[i][1] for i in kept)
    if all(shapes[i] == [hmax, wmax] for i in kept):
        stacked = torch.stack(decoded)  # (M, C, H, W)
    else:  # pad to a common size; the crop weights are zero outside each image
        stacked = torch.zeros(len(kept), decoded[0].shape[0], hmax, wmax, dtype=torch.uint8, device=device)
        for k, img in enumerate(decoded):
            stacked[k, :, : img.shape[1], : img.shape[2]] = img
    return resized_crops(stacked, batch.crops[kept].to(device), batch.size), dropped


def _decode_jpegs(blobs: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """decode_jpeg on a list (nvjpeg's batched decode on CUDA); if the batch fails, one by one, then on the
    CPU; None for a JPEG nothing can decode."""
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        out: list[Tensor | None] = []
        for blob in blobs:
            try:
                out.append(decode_jpeg(blob, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                try:
                    out.append(decode_jpeg(blob, mode=ImageReadMode.RGB).to(device))
                except RuntimeError:
                    out.append(None)
        return out


def resized_crops(images: Tensor, crops: Tensor, size: int) -> Tensor:
    """Crop, resize to (S, S) with Pillow's bicubic filter, and flip, every image at once.

    images (N, C, H, W) uint8 (padded images are fine: weights are zero outside each crop); crops (N, 5)
    top, left, height, width, flip -> (N, C, S, S) uint8. Pillow resamples the crop horizontally, rounds to
    8 bits, then vertically and rounds again; so does this, with Pillow's 22-bit fixed-point weights, so on
    the CPU (float32) it gives Pillow's pixels but for rare +-1 ties. On CUDA the products run in float16
    (exact for 0-255 pixels; weights to 11 bits), which moves some pixels by one level.
    """
    n, c, h, w = images.shape
    dtype = torch.float16 if images.device.type == "cuda" else torch.float32
    crops = crops.to(images.device)
    flip = crops[:, 4].bool()
    wx = _bicubic_weights(crops[:, 1], crops[:, 3], w, size)  # (N, S, W)
    wx = torch.where(flip[:, None, None], wx.flip(1), wx).to(dtype)  # the flip reverses the output columns
    wy = _bicubic_weights(crops[:, 0], crops[:, 2], h, size).to(dtype)  # (N, S, H)
    x = images.to(dtype).reshape(n, c * h, w)  # (N, C*H, W)
    tmp = _round8(torch.bmm(x, wx.transpose(1, 2)))  # (N, C*H, S): the horizontal pass
    out = torch.matmul(wy[:, None], tmp.view(n, c, h, size))  # (N, 1, S, H) @ (N, C, H, S) -> (N, C, S, S)
    return _round8(out).to(torch.uint8)


def _round8(x: Tensor) -> Tensor:
    """Pillow's clip8: round half up, clamp to [0, 255]."""
    return (x.float() + 0.5).floor_().clamp_(0, 255).to(x.dtype)


def _bicubic_weights(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """Pillow's precompute_coeffs for resizing [start, start + length) of an axis of `in_size` pixels to
    `out_size`, batched: start, length (N,) -> (N, out_size, in_size) float64, zero outside the crop, each
    row summing to one, quantised to Pillow's fixed point."""
    dev = start.device
    start, length = start.double()[:, None, None], length.double()[:, None, None]  # (N, 1, 1)
    scale = length / out_size
    filterscale = scale.clamp(min=1.0)  # antialias: widen the kernel when shrinking
    support = 2.0 * filterscale
    center = (
        torch.arange(out_size, device=dev, dtype=torch.float64)[None, :, None] + 0.5
    ) * scale  # (N, S, 1)
    xmin = torch.floor(center - support + 0.5).clamp(min=0)
    xmax = torch.minimum(torch.floor(center + support + 0.5), length)
    x = torch.arange(in_size, device=dev, dtype=torch.float64)[None, None, :] - start  # (N, 1, W) crop coords
    t = ((x - center + 0.5) / filterscale).abs()  # (N, S, W)
    a = _BICUBIC_A
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = (((t - 5.0) * t + 8.0) * t - 4.0) * a
    k = torch.where(t < 1.0, near, torch.where(t < 2.0, far, torch.zeros_like(t)))
    k = k * ((x >= xmin) & (x < xmax))
    total = k.sum(-1, keepdim=True)
    k = k / torch.where(total == 0, torch.ones_like(total), total)
    one = float(1 << _PRECISION_BITS)
    return torch.where(k < 0, torch.trunc(k * one - 0.5), torch.trunc(k * one + 0.5)) / one
