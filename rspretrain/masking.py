"""Token scoring and selection for SelectiveMAE and MAE: pure tensor functions, no modules, no state.

Shapes use one alphabet: N batch, C channels, H/W pixels, p patch size, L patches, D width,
V visible patches, K reconstructed (target) patches, R noise channels.

Every random choice is read from a caller-supplied uniform tensor ``noise`` so that a sample's masks
depend only on its own noise row. ``counter_uniform`` makes that noise from (seed, step, sample index),
which makes a data-parallel run draw exactly the masks of a single-process run.

SelectiveMAE noise channels (``noise[:, r]``, each (N, L)):
    0  keys of the semantic selection of the first half of the visible patches (Gumbel noise when
       sampling, tie-breaks for top-k)
    1  tie-breaks and random picks of PSTS expansion step 1
    2  the same for expansion step 2
    3  keys of the semantic selection of the reconstruction targets among the masked patches
MAE uses one channel: the keys of its uniform random shuffle.

Every selection is "the k largest keys": ``selection_keys`` turns scores and noise into keys, so sampling
without replacement (Gumbel-top-k, the law of the reference's ``torch.multinomial``) and deterministic
top-k share one code path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

SELECTIVE_NOISE_CHANNELS = 4
MAE_NOISE_CHANNELS = 1

# Reference schedule of SelectiveMAE: epochs 280 / 300 / 580 / 600 of 800, as fractions of the run.
DEFAULT_PSTS_STAGES: tuple[float, float, float, float] = (0.35, 0.375, 0.725, 0.75)

# HOG block-normalisation constant, in units of mean gradient magnitude per pixel on a [0, 1] intensity
# scale (Sobel / 8 is an intensity difference per pixel). On 46 real aerial and satellite 224 px crops
# (shared/data/rs-real) block energies had quantiles 5%: 0.003, 10%: 0.009, 50%: 0.040, 90%: 0.089,
# 99%: 0.20; flat water and haze sit near 0.002. With eps = 0.03 those score 0.07 (flat), 0.28, 0.80,
# 0.95, 0.99: graded over ordinary texture, saturating only on strong edges.
HOG_EPS = 0.03
# Default softmax temperature turning scores in [0, 1) into a sampling distribution (model.semantic_temperature).
# Scores are bounded, so the most textured patch is at most exp(1 / T) = 20x as likely as a perfectly flat
# one: the floor that keeps flat patches (water, bare fields, cloud) in play. A median real patch (score
# 0.8) is 11x. (The reference uses T = 1 on its scores, which are identically zero.)
SEMANTIC_TEMPERATURE = 1.0 / 3.0
SELECTIONS = ("sample", "topk")

_Int = TypeVar("_Int", int, Tensor)
_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9


# ----------------------------------------------------------------------------------------------
# token counts


def num_visible_patches(num_patches: int, mask_ratio: float) -> int:
    """Patches fed to the encoder: floor(L * (1 - mask_ratio)), as the reference (196, 0.85 -> 29)."""
    # The small tolerance keeps exact products (196 * 0.25 = 49) from flooring to 48 through rounding.
    n = int(num_patches * (1.0 - mask_ratio) + 1e-6)
    if not 1 <= n <= num_patches:
        raise ValueError(f"mask_ratio={mask_ratio} leaves {n} of {num_patches} patches visible; use (0, 1)")
    return n


def num_target_patches(num_patches: int, kept_mask_ratio: float, num_visible: int) -> int:
    """Masked patches reconstructed by SelectiveMAE: floor(L * kept_mask_ratio) (196, 0.25 -> 49)."""
    n = int(num_patches * kept_mask_ratio + 1e-6)
    if not 1 <= n <= num_patches - num_visible:
        raise ValueError(
            f"kept_mask_ratio={kept_mask_ratio} asks for {n} targets but only "
            f"{num_patches - num_visible} of {num_patches} patches are masked; lower it"
        )
    return n


# ----------------------------------------------------------------------------------------------
# counter-based noise


def _mix32(x: _Int) -> _Int:
    """Chris Wellons' lowbias32 integer hash, on Python ints or int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: _Int, c: int) -> _Int:
    # (x * c) mod 2**32 without overflowing int64: split c into 16-bit halves.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _absorb(h: _Int, v: _Int) -> _Int:
    """Fold a 64-bit value into a 32-bit hash state, low word then high word."""
    h = _mix32(((h ^ (v & _MASK32)) + _GOLDEN32) & _MASK32)
    return _mix32(((h ^ ((v >> 32) & _MASK32)) + _GOLDEN32) & _MASK32)


def counter_uniform(seed: int, step: int, sample_index: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(N,) int64 global sample indices -> (N, *shape) float32 uniform in (0, 1).

    Each value is an integer hash of (seed, step, sample index, element index), so it is the same on
    any device and for any split of the batch across ranks. Values are odd multiples of 2**-24: never
    0 or 1, so log(u) and log(-log(u)) stay finite. Seed and step are hashed in Python, so no host to
    device copy (and no wait for the GPU) happens here.
    """
    device = sample_index.device
    idx = sample_index.to(torch.int64)  # (N,)
    key = _absorb(_absorb(0, int(seed)), int(step))  # a Python int in [0, 2**32)
    h = _absorb(torch.full_like(idx, key), idx)  # (N,)
    numel = math.prod(shape)
    elem = torch.arange(numel, dtype=torch.int64, device=device)  # (M,)
    bits = _mix32(((h[:, None] ^ elem[None, :]) + _GOLDEN32) & _MASK32)  # (N, M)
    bits = _mix32((bits + _GOLDEN32) & _MASK32) >> 9  # 23 bits
    u = (bits.to(torch.float32) * 2.0 + 1.0) * (2.0**-24)  # (N, M) in (0, 1)
    return u.reshape(idx.shape[0], *shape)


# ----------------------------------------------------------------------------------------------
# semantic scores


def _hog_cells_per_patch(patch_size: int, cell_size: int) -> int:
    """Cells per patch side: about patch_size / cell_size, and a divisor of patch_size (14 px -> 2 x 7)."""
    k = max(1, round(patch_size / cell_size))
    while patch_size % k:
        k -= 1
    return k


def _gaussian_window(patch_size: int, device: torch.device) -> Tensor:
    """(p, p) Gaussian centred on the patch, sigma = p / 2 (Dalal-Triggs: half the block width), mean 1."""
    r = (torch.arange(patch_size, device=device, dtype=torch.float32) + 0.5 - patch_size / 2) / (
        patch_size / 2
    )
    g = torch.exp(-0.5 * r**2)  # (p,)
    w = g[:, None] * g[None, :]  # (p, p)
    return w / w.mean()


@torch.no_grad()
def hog_scores(
    imgs: Tensor,
    patch_size: int,
    pixel_std: Sequence[float] | Tensor | None = None,
    cell_size: int = 8,
    nbins: int = 9,
    eps: float = HOG_EPS,
) -> Tensor:
    """Per-patch texture/structure score in [0, 1) from HOG. (N, C, H, W) -> (N, L).

    imgs are normalised per channel; ``pixel_std`` (C,) undoes the division so gradients are in
    intensity units on a [0, 1] scale (the mean does not matter to a gradient). None: imgs are taken
    as already on that scale.

    Per patch, one HOG block: Sobel gradients (channel of largest magnitude per pixel, Dalal-Triggs),
    unsigned orientation soft-binned into ``nbins`` bins, magnitudes weighted by a Gaussian window over
    the patch, histograms averaged over cells of about ``cell_size`` px (2 x 2 cells of 8 px for p=16).
    The block vector v (cells * nbins) is HOG-normalised, v / sqrt(|v|^2 + eps^2), and the score is the
    norm of that normalised vector, |v| / sqrt(|v|^2 + eps^2).

    Why this scalar: the L2 norm of a histogram is its total gradient energy times a coherence factor
    between 1/sqrt(nbins) (orientations spread evenly, as in sensor noise) and 1 (one orientation, as
    along roads, roof edges, field boundaries). So it ranks structure above isotropic noise at equal
    energy and anything textured far above flat ground, while the HOG normalisation saturates it:
    above a few eps of gradient, contrast stops mattering (shaded and sunlit roofs score alike), which
    is HOG's illumination invariance. Histogram non-uniformity alone was not used: it is undefined on
    flat patches, scores isotropic textures (forest, dense urban) as low as noise, and would need this
    energy term as a gate anyway.
    """
    N, C, H, W = imgs.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} is not a whole number of {p} px patches")
    device = imgs.device
    with torch.autocast(device_type=device.type, enabled=False):
        x = imgs.float()
        if pixel_std is not None:
            std = torch.as_tensor(pixel_std, dtype=torch.float32, device=device).reshape(1, C, 1, 1)
            x = x * std  # (N, C, H, W), intensity scale up to an offset per channel
        # Separable Sobel by shifted slices (half the time of a grouped conv2d on CPU), divided by 8 so a
        # gradient is an intensity difference per pixel. Replicate padding: no fake edges at the border.
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")  # (N, C, H+2, W+2)
        dx = x[..., 2:] - x[..., :-2]  # (N, C, H+2, W)
        sy = x[..., :-2] + 2.0 * x[..., 1:-1] + x[..., 2:]  # (N, C, H+2, W)
        gx = (dx[..., :-2, :] + 2.0 * dx[..., 1:-1, :] + dx[..., 2:, :]) * 0.125  # (N, C, H, W)
        gy = (sy[..., 2:, :] - sy[..., :-2, :]) * 0.125  # (N, C, H, W)
        mag2 = gx.square() + gy.square()  # (N, C, H, W)
        if C > 1:
            # Per pixel, the channel with the strongest gradient (Dalal-Triggs). max, not argmax: the
            # latter is 10x slower on CPU.
            mag2, best = mag2.max(1, keepdim=True)  # (N, 1, H, W)
            gx, gy = gx.gather(1, best), gy.gather(1, best)  # (N, 1, H, W)

        # Unsigned orientation in [0, pi), soft-assigned to the two nearest of nbins bins centred at
        # (b + 0.5) * pi / nbins. Bin positions run from -0.5 to nbins - 0.5, so the lower bin is -1..nbins-1;
        # histogramming into nbins + 2 slots (offset 1) and folding the two end slots back afterwards
        # avoids integer modulo on every pixel.
        theta = torch.remainder(torch.atan2(gy, gx), math.pi)  # (N, 1, H, W)
        pos = theta * (nbins / math.pi) + 0.5  # slot position, lower slot in 0..nbins
        lower = pos.floor()
        frac = pos - lower
        window = _gaussian_window(p, device).repeat(H // p, W // p)  # (H, W)
        m = (mag2.sqrt() * window).view(N, H * W)  # (N, HW) Gaussian-weighted magnitude
        m_up = m * frac.view(N, H * W)  # (N, HW) share of the upper slot

        # Histogram straight into (slot, cell) bins: index = slot * cells + cell. This is 3x faster on
        # CPU than a dense (N, slots, H, W) tensor pooled afterwards. (On CUDA the adds are atomic, so
        # the last bits of a score may vary from run to run; scores only steer sampling.)
        k = _hog_cells_per_patch(p, cell_size)
        cell = p // k
        ch, cw = H // cell, W // cell
        rows = torch.arange(H, device=device) // cell
        cols = torch.arange(W, device=device) // cell
        cell_of_pixel = (rows[:, None] * cw + cols[None, :]).view(1, H * W)  # (1, HW)
        index = lower.long().view(N, H * W) * (ch * cw) + cell_of_pixel  # (N, HW) lower slot
        hist = torch.zeros(N, (nbins + 2) * ch * cw, device=device)  # (N, slots * cells)
        hist.scatter_add_(1, index, m - m_up)
        hist.scatter_add_(1, index + ch * cw, m_up)
        hist = hist.view(N, nbins + 2, ch, cw) / (cell * cell)  # mean weighted gradient per bin and cell
        hist = torch.cat(
            [hist[:, 1:2] + hist[:, -1:], hist[:, 2:-2], hist[:, -2:-1] + hist[:, :1]], dim=1
        )  # (N, nbins, ch, cw): slot nbins + 1 is bin 0, slot 0 is bin nbins - 1
        gh, gw = H // p, W // p
        blocks = hist.view(N, nbins, gh, k, gw, k).permute(0, 2, 4, 3, 5, 1)  # (N, gh, gw, k, k, nbins)
        energy = blocks.reshape(N, gh * gw, k * k * nbins).norm(dim=-1)  # (N, L)
        return energy / torch.sqrt(energy.square() + eps * eps)


def uniform_scores(imgs: Tensor, patch_size: int) -> Tensor:
    """All-zero scores, (N, C, H, W) -> (N, L): a uniform sampling distribution.

    This is what the reference code's HOG score amounts to: it standardises each patch's HOG vector and
    then averages it, which is identically zero.
    """
    N, _, H, W = imgs.shape
    return torch.zeros(N, (H // patch_size) * (W // patch_size), device=imgs.device)


def semantic_log_probs(scores: Tensor, temperature: float = SEMANTIC_TEMPERATURE) -> Tensor:
    """(N, L) scores -> (N, L) log-probabilities of the semantic sampling distribution."""
    return F.log_softmax(scores.float() / temperature, dim=-1)


# ----------------------------------------------------------------------------------------------
# sampling primitives


def _gumbel(u: Tensor) -> Tensor:
    # u from torch.rand can be exactly 0; counter_uniform never is.
    u = u.float().clamp(1e-12, 1.0 - 2.0**-24)
    return -torch.log(-torch.log(u))


def gumbel_topk(log_probs: Tensor, k: int, u: Tensor, exclude: Tensor | None = None) -> Tensor:
    """k indices per row drawn without replacement with probabilities exp(log_probs). (N, L) -> (N, k).

    Gumbel-top-k: the k largest log p + Gumbel(u) are a sample of successive draws without replacement,
    the same law as torch.multinomial(p, k), but batched and driven by the given noise. ``exclude``
    (N, L) bool marks patches that may not be drawn.
    """
    return top_keys(log_probs.float() + _gumbel(u), k, exclude)


def top_keys(keys: Tensor, k: int, exclude: Tensor | None = None) -> Tensor:
    """(N, L) keys -> (N, k) indices of the k largest, never one marked in ``exclude`` (N, L) bool."""
    if exclude is not None:
        keys = keys.masked_fill(exclude, float("-inf"))
    return keys.topk(k, dim=-1).indices  # (N, k)


def selection_keys(
    scores: Tensor, u: Tensor, selection: str = "sample", temperature: float = SEMANTIC_TEMPERATURE
) -> Tensor:
    """(N, L) scores and (N, L) uniform noise -> (N, L) keys whose k largest are the semantic selection.

    "sample": log softmax(scores / temperature) + Gumbel(u), so the top k are a draw without replacement
    from the semantic distribution (the reference's torch.multinomial). "topk": the scores themselves, the
    k highest-scoring patches, with a 1e-6 * u jitter that only breaks exact ties (flat or nodata patches,
    uniform scores) at random instead of towards the top-left corner.
    """
    if selection == "topk":
        return scores.float() + 1e-6 * u.float()
    if selection != "sample":
        raise ValueError(f"selection={selection!r}: use one of {SELECTIONS}")
    return semantic_log_probs(scores, temperature) + _gumbel(u)


# ----------------------------------------------------------------------------------------------
# Progressive Semantic Token Selection


def psts_stage_weights(
    progress: float, stages: Sequence[float] = DEFAULT_PSTS_STAGES
) -> tuple[float, float, float]:
    """Fractions (near, far, random) of the PSTS expansion picks at ``progress`` in [0, 1].

    Before stages[0]: all near (most similar to the selected set); stages[0]..[1]: linear blend near ->
    far; [1]..[2]: all far (least similar); [2]..[3]: blend far -> random; from stages[3]: all random.
    """
    a, b, c, d = (float(s) for s in stages)
    if not 0.0 <= a <= b <= c <= d <= 1.0:
        raise ValueError(f"psts_stages must be non-decreasing fractions in [0, 1], got {tuple(stages)}")
    if progress < a:
        return (1.0, 0.0, 0.0)
    if progress < b:
        t = (progress - a) / (b - a)
        return (1.0 - t, t, 0.0)
    if progress < c:
        return (0.0, 1.0, 0.0)
    if progress < d:
        t = (progress - c) / (d - c)
        return (0.0, 1.0 - t, t)
    return (0.0, 0.0, 1.0)


def expansion_counts(n: int, weights: tuple[float, float, float]) -> tuple[int, int, int]:
    """Split n picks into (near, far, random) counts by ``weights``, flooring as the reference does."""
    w_near, w_far, _ = weights
    c1 = int(w_near * n + 1e-9)
    c2 = max(c1, min(n, int((w_near + w_far) * n + 1e-9)))
    return c1, c2 - c1, n - c2


def psts_counts(num_visible: int) -> tuple[int, int, int]:
    """(initial semantic draw, expansion step 1, expansion step 2) counts of V visible patches.

    As the reference: floor(V / 2) drawn first, the other ceil(V / 2) added in two steps of floor and ceil
    of half (196 patches at mask ratio 0.85: 29 = 14 + 7 + 8).
    """
    n_init = num_visible // 2
    n_expand = num_visible - n_init
    return n_init, n_expand // 2, n_expand - n_expand // 2


def psts_select(
    keys: Tensor,
    features: Tensor,
    num_visible: int,
    progress: float,
    noise: Tensor,
    stages: Sequence[float] = DEFAULT_PSTS_STAGES,
) -> Tensor:
    """Visible patch indices by Progressive Semantic Token Selection. -> (N, V) int64.

    keys (N, L): keys of the semantic selection (``selection_keys``). features (N, L, D): what the
    expansion ranks by cosine similarity (the reference: patch embedding + position embedding). noise
    (N, 2, L): channels 1-2 of the model's noise (expansion steps 1 and 2).

    The floor(V / 2) patches of largest key come first; the remaining ones are added in two steps (floor
    and ceil of half), each ranking every unselected patch by its largest cosine similarity to the patches
    selected so far and taking the most similar ("near"), the least similar ("far") and uniformly random
    ones in the proportions of ``psts_stage_weights(progress)``.
    """
    N, L = keys.shape
    n_init, *step_sizes = psts_counts(num_visible)
    counts = [expansion_counts(n, psts_stage_weights(progress, stages)) for n in step_sizes]

    selected = top_keys(keys, n_init)  # (N, n_init)
    taken = torch.zeros(N, L, dtype=torch.bool, device=keys.device)  # (N, L)
    taken.scatter_(1, selected, True)
    emb = F.normalize(features.detach().float(), dim=-1)  # (N, L, D)
    D = emb.shape[-1]
    for step, (n_near, n_far, n_random) in enumerate(counts):
        if n_near + n_far + n_random == 0:
            continue
        u = noise[:, step].float()  # (N, L)
        sel_emb = emb.gather(1, selected[:, :, None].expand(N, selected.shape[1], D))  # (N, S, D)
        sim = torch.bmm(emb, sel_emb.transpose(1, 2)).amax(-1)  # (N, L): closest selected patch
        # The 1e-6 jitter only breaks exact ties (identical patches, e.g. nodata), which topk would
        # otherwise always resolve towards the top-left corner.
        picks = []
        for n, key in ((n_near, sim + 1e-6 * u), (n_far, 1e-6 * u - sim), (n_random, u)):
            if n == 0:
                continue
            idx = key.masked_fill(taken, float("-inf")).topk(n, dim=-1).indices  # (N, n)
            taken.scatter_(1, idx, True)
            picks.append(idx)
        selected = torch.cat([selected, *picks], dim=1)  # (N, S + n)
    return selected


def sample_targets(keys: Tensor, visible_index: Tensor, num_targets: int) -> Tensor:
    """K masked patches to reconstruct: the largest keys among the patches not visible. -> (N, K) int64.

    keys (N, L) from ``selection_keys`` on noise channel 3; visible_index (N, V).
    """
    visible = torch.zeros_like(keys, dtype=torch.bool).scatter_(1, visible_index, True)  # (N, L)
    return top_keys(keys, num_targets, exclude=visible)


def random_masking(u: Tensor, num_visible: int) -> tuple[Tensor, Tensor]:
    """MAE's uniform random masking from noise u (N, L) -> (visible (N, V), masked (N, L - V)) indices."""
    order = u.argsort(dim=-1)  # (N, L): a uniformly random permutation per row
    return order[:, :num_visible], order[:, num_visible:]
