"""pHash of tiles, bit-identical to ``imagehash.phash`` and batched, its flip/rotation variants, and the
hex codec. The search over hashes is rscurate.dedup's; decontamination is rscurate.decontam's.

The steps are imagehash 4.3's: grey with Pillow's ``convert('L')``, LANCZOS resize to 32x32, DCT-II
(``scipy.fftpack.dct``) along rows and then columns, the top-left 8x8 coefficients, a bit set where a
coefficient exceeds their median, bits read row by row with the first as the most significant.

Pillow still does the grey conversion and the resize, tile by tile, because bit-identity rests on its
fixed-point LANCZOS weights. The DCT, median and bit packing run once for a whole batch. The DCT is
scipy.fftpack's, not a matrix product: on a flat tile every AC coefficient is exactly 0 through the FFT
but about 1e-11 through a matrix product, and the bits of flat tiles would change.

Flips and 90-degree rotations (the dihedral group of the square, `DIHEDRAL`) act on the DCT exactly:
mirroring the 32x32 thumbnail left-right negates the coefficients of odd horizontal frequency, mirroring
it top-bottom those of odd vertical frequency, and transposing it transposes the coefficients. So the
pHash of each of the 8 variants of an image (`phash_variants`) comes from one resize and one DCT, each
with its own median. `phash_with_canonical` adds the pHash of the variant in a canonical orientation
(the one whose two lowest AC coefficients are positive and the horizontal one the larger), which is the
same for an image and for any flip or rotation of it, unless those two coefficients are nearly equal in
size or nearly zero.

A hash is a Python int or a uint64 in memory and 16 lowercase hex digits in tables, as imagehash
prints it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.fftpack
from PIL import Image

from rscurate import resample

log = logging.getLogger(__name__)

HASH_SIZE = 8  # the hash is HASH_SIZE x HASH_SIZE bits
RESIZE = 32  # imagehash's hash_size * highfreq_factor
_BATCH = 4096  # tiles per DCT call: about 16 KiB of float64 temporaries each
_HEX16 = re.compile(r"[0-9a-fA-F]{16}")
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_HEX_VALUE = np.full(128, 255, dtype=np.uint8)  # ASCII code -> nibble; 255: not a hex digit
_HEX_VALUE[_HEX_DIGITS] = np.arange(16)
_HEX_VALUE[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = np.arange(10, 16)
# The first HASH_SIZE rows of scipy.fftpack's unnormalised DCT-II on RESIZE points: 2 cos(pi k (2n + 1) / 2N).
_DCT_LOW = (
    2 * np.cos(np.pi * np.arange(HASH_SIZE)[:, None] * (2 * np.arange(RESIZE)[None, :] + 1) / (2 * RESIZE))
).astype(np.float32)  # (8, 32)

# The 8 flips and rotations of a square, as (transpose, flip rows, flip columns) applied in that order to an
# (H, W) image: `rot90` is np.rot90 (counter-clockwise, as Pillow's Transpose.ROTATE_90).
DIHEDRAL: dict[str, tuple[bool, bool, bool]] = {
    "identity": (False, False, False),
    "hflip": (False, False, True),  # mirrored left-right
    "vflip": (False, True, False),  # mirrored top-bottom
    "rot180": (False, True, True),
    "transpose": (True, False, False),
    "rot90": (True, True, False),
    "rot270": (True, False, True),
    "transverse": (True, True, True),  # mirrored about the anti-diagonal
}
VARIANTS = tuple(DIHEDRAL)


# ---------------------------------------------------------------------------------------------------
# Hashing


def phash(tile: np.ndarray) -> int:
    """64-bit pHash of an (H, W, 3) RGB or (H, W) grey uint8 tile, equal to imagehash.phash's."""
    return int(_dct_bits(_grey_32(tile)[None])[0])


def phash_batch(tiles: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(N,) uint64 pHashes of N tiles, each (H, W, 3) RGB or (H, W) grey uint8; sizes may differ."""
    hashes = np.empty(len(tiles), dtype=np.uint64)
    for start, small in _thumbnail_blocks(tiles):
        hashes[start : start + len(small)] = _dct_bits(small)
    return hashes


def phash_variants(tiles: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(N, 8) uint64: the pHash of each tile's 8 flips and rotations, columns in `VARIANTS` order, each
    equal to `phash` of the flipped or rotated tile.

    Two resizes per tile, of the tile and of its transpose: flips act on the coefficients exactly, but a
    transpose does not quite commute with Pillow's resize (it rounds between its horizontal and vertical
    passes), which would move a few bits of the transposed variants of one tile in six.
    """
    out = np.empty((len(tiles), len(VARIANTS)), dtype=np.uint64)
    for start, small in _thumbnail_blocks(tiles):
        low = _low_coefficients(small)  # (n, 8, 8)
        block = tiles[start : start + len(small)]
        transposed = np.stack([_grey_32(np.swapaxes(np.asarray(t), 0, 1)) for t in block])  # (n, 32, 32)
        low_t = _low_coefficients(transposed)
        for v, (transpose, flip_rows, flip_cols) in enumerate(DIHEDRAL.values()):
            out[start : start + len(small), v] = _bits(
                flip_coefficients(low_t if transpose else low, flip_rows, flip_cols)
            )
    return out


def phash_with_canonical(tiles: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(N, 2) uint64: each tile's pHash (as `phash_batch`) and the pHash of its canonical orientation.

    The canonical orientation is the flip/rotation after which the lowest horizontal AC coefficient is
    positive and at least as large as the lowest vertical one, which is positive too; any flip or
    rotation of a tile has the same canonical hash (see the module docstring for when it does not).
    """
    out = np.empty((len(tiles), 2), dtype=np.uint64)
    for start, small in _thumbnail_blocks(tiles):
        low = _low_coefficients(small)  # (n, 8, 8)
        out[start : start + len(small), 0] = _bits(low)
        out[start : start + len(small), 1] = _bits(canonical_coefficients(low))
    return out


def flip_coefficients(low: np.ndarray, flip_rows: bool, flip_cols: bool) -> np.ndarray:
    """(N, 8, 8) low DCT coefficients of thumbnails mirrored top-bottom and/or left-right."""
    sign = np.ones((HASH_SIZE, HASH_SIZE))
    if flip_rows:  # DCT-II of a reversed sequence: coefficient k times (-1)^k
        sign[1::2, :] = -1
    if flip_cols:
        sign[:, 1::2] *= -1
    return low * sign


def canonical_coefficients(low: np.ndarray) -> np.ndarray:
    """(N, 8, 8): each thumbnail's low coefficients in its canonical orientation (see phash_with_canonical)."""
    # Transpose where the vertical first harmonic is the larger; then flip so both are positive.
    swap = np.abs(low[:, 1, 0]) > np.abs(low[:, 0, 1])  # (N,)
    out = np.where(swap[:, None, None], low.transpose(0, 2, 1), low)
    rows = np.where(out[:, 1, 0] < 0, -1.0, 1.0)  # (N,) sign applied to odd vertical frequencies
    cols = np.where(out[:, 0, 1] < 0, -1.0, 1.0)
    parity = np.arange(HASH_SIZE) % 2 == 1
    sign = np.where(parity[None, :, None], rows[:, None, None], 1.0) * np.where(
        parity[None, None, :], cols[:, None, None], 1.0
    )  # (N, 8, 8)
    return out * sign


def _thumbnail_blocks(tiles: Sequence[np.ndarray] | np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(start, (n, 32, 32) uint8 grey thumbnails) for consecutive blocks of at most _BATCH tiles."""
    for start in range(0, len(tiles), _BATCH):
        block = tiles[start : start + _BATCH]
        # (n, 32, 32) grey: Pillow's convert('L') + LANCZOS resize bit for bit, one matrix product per
        # size for the whole block (rscurate.resample)
        small = resample.grey_thumbnails([np.asarray(t) for t in block], RESIZE)
        yield start, small


def _grey_32(tile: np.ndarray) -> np.ndarray:
    """(32, 32) uint8: Pillow's grey conversion and LANCZOS resize of one tile."""
    tile = np.asarray(tile)
    if tile.dtype != np.uint8 or not (tile.ndim == 2 or (tile.ndim == 3 and tile.shape[2] == 3)):
        raise ValueError(f"a tile must be (H, W, 3) or (H, W) uint8, got {tile.dtype} {tile.shape}")
    if tile.shape[0] == 0 or tile.shape[1] == 0:
        raise ValueError(f"a tile must have at least one pixel, got shape {tile.shape}")
    image = Image.fromarray(np.ascontiguousarray(tile))
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image.resize((RESIZE, RESIZE), Image.Resampling.LANCZOS))


def thumbnail_hashes(small: np.ndarray) -> np.ndarray:
    """(N,) uint64 hashes of (N, 32, 32) grey thumbnails that are already made (any real dtype; the bits
    do not change when every pixel is scaled by the same factor).

    The low DCT coefficients come from two matrix products here, not scipy's FFT: several times faster
    for many small thumbnails, and equal to the FFT's except on near-flat thumbnails (see the module
    docstring), which callers of this function leave out.
    """
    x = np.asarray(small, dtype=np.float32)  # (N, 32, 32)
    low = _DCT_LOW @ x @ _DCT_LOW.T  # (8, 32) @ (N, 32, 32) @ (32, 8) -> (N, 8, 8)
    return _bits(low)


def _dct_bits(small: np.ndarray) -> np.ndarray:
    """(N,) uint64 hashes of (N, 32, 32) grey thumbnails."""
    return _bits(_low_coefficients(small))


def _low_coefficients(small: np.ndarray) -> np.ndarray:
    """(N, 8, 8) float64: the top-left DCT-II coefficients of (N, 32, 32) thumbnails."""
    # imagehash: dct(dct(pixels, axis=0), axis=1) on one (32, 32) image; axis 0 here is the batch.
    coeffs = scipy.fftpack.dct(scipy.fftpack.dct(small, axis=1), axis=2)  # (N, 32, 32) float64
    return coeffs[:, :HASH_SIZE, :HASH_SIZE]


def _bits(low: np.ndarray) -> np.ndarray:
    """(N,) uint64 from (N, 8, 8) coefficients: a bit where a coefficient exceeds their median."""
    n = low.shape[0]
    flat = low.reshape(n, HASH_SIZE * HASH_SIZE)  # (N, 64)
    # The median of 64 values, as np.median computes it: the mean of the 32nd and 33rd smallest. A full
    # sort of rows this short is several times faster than np.partition's per-row selection.
    middle = np.sort(flat, axis=1)[:, 31:33]  # (N, 2)
    bits = flat > (middle[:, :1] + middle[:, 1:]) / 2  # (N, 64) bool
    packed = np.packbits(bits, axis=1)  # (N, 8) uint8, first bit the most significant
    return packed.view(">u8").reshape(n).astype(np.uint64)


# ---------------------------------------------------------------------------------------------------
# Hex codec


def to_hex(h: int | np.integer) -> str:
    """16 lowercase hex digits, as str(imagehash.phash(...))."""
    value = int(h)
    if not 0 <= value < 1 << 64:
        raise ValueError(f"a hash must lie in 0..2**64-1, got {value}")
    return f"{value:016x}"


def from_hex(s: str) -> int:
    """The hash written as 16 hex digits."""
    return int(from_hex_array([s])[0])


def to_hex_array(hashes: np.ndarray) -> np.ndarray:
    """(N,) uint64 -> (N,) str of 16 lowercase hex digits each (numpy '<U16')."""
    h = np.asarray(hashes)
    if h.dtype != np.uint64 or h.ndim != 1:
        raise ValueError(f"hashes must be a 1-D uint64 array, got {h.dtype} with shape {h.shape}")
    octets = h.astype(">u8").view(np.uint8).reshape(h.size, 8)  # (N, 8), most significant first
    nibbles = np.stack([octets >> 4, octets & 15], axis=2).reshape(h.size, 16)  # (N, 16)
    return _HEX_DIGITS[nibbles].view("S16").reshape(h.size).astype("<U16")


def from_hex_array(values: Sequence[str] | np.ndarray | pd.Series) -> np.ndarray:
    """(N,) hex strings of 16 digits (either case) -> (N,) uint64."""
    text = np.asarray(values, dtype=np.str_)
    if text.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of hex strings, got shape {text.shape}")
    n = text.size
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    valid = np.char.str_len(text) == 16
    if valid.all():
        codes = text.astype("<U16").view(np.uint32).reshape(n, 16)  # (N, 16) code points
        nibbles = _HEX_VALUE[np.minimum(codes, 127)]  # (N, 16), 255 where not a hex digit
        valid = (nibbles != 255).all(axis=1)
    if not valid.all():
        bad = int(np.flatnonzero(~valid)[0])
        raise ValueError(
            f"hash {text[bad]!r} (item {bad}) is not 16 hex digits; "
            f"{int((~valid).sum())} of {n} values are malformed"
        )
    octets = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]  # (N, 8), most significant first
    return octets.view(">u8").reshape(n).astype(np.uint64)


def table_hashes(tiles: pd.DataFrame) -> np.ndarray:
    """(N,) uint64 from a table's `phash` column; a malformed value is an error naming its tile key."""
    values = tiles["phash"].to_numpy()
    try:
        return from_hex_array(values)
    except ValueError:
        bad = [
            k
            for k, v in zip(tiles["key"], values, strict=True)
            if not (isinstance(v, str) and _HEX16.fullmatch(v))
        ]
        raise ValueError(f"{len(bad)} tiles have no valid phash (16 hex digits), first {bad[:5]}") from None
