"""Token scoring and selection: counts, counter noise, HOG scores, Gumbel sampling, PSTS stages and picks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rspretrain import masking


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small tensors are latency-bound: one thread is faster and does not stall when other jobs share the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_token_counts_match_the_paper():
    # ViT-B/16 and ViT-L/16 at 224 px: 196 patches.
    assert masking.num_visible_patches(196, 0.85) == 29
    assert masking.num_target_patches(196, 0.25, 29) == 49
    assert masking.num_visible_patches(196, 0.75) == 49  # MAE
    # ViT-H/14 at 224 px: 256 patches.
    assert masking.num_visible_patches(256, 0.85) == 38
    assert masking.num_target_patches(256, 0.25, 38) == 64


def test_impossible_ratios_are_refused():
    with pytest.raises(ValueError, match="mask_ratio"):
        masking.num_visible_patches(196, 1.0)
    with pytest.raises(ValueError, match="kept_mask_ratio"):
        masking.num_target_patches(196, 0.9, 29)


# ---------------------------------------------------------------------------------------------- noise


def test_counter_uniform_is_deterministic_and_split_invariant():
    idx = torch.arange(8)
    whole = masking.counter_uniform(7, 3, idx, (4, 196))
    assert whole.shape == (8, 4, 196) and whole.dtype == torch.float32
    halves = torch.cat(
        [masking.counter_uniform(7, 3, idx[:4], (4, 196)), masking.counter_uniform(7, 3, idx[4:], (4, 196))]
    )
    assert torch.equal(whole, halves)
    assert torch.equal(whole, masking.counter_uniform(7, 3, idx, (4, 196)))
    # A row depends on the sample index, not on its position in the batch.
    shuffled = masking.counter_uniform(7, 3, idx.flip(0), (4, 196))
    assert torch.equal(whole, shuffled.flip(0))


def test_counter_uniform_values_are_uniform_and_keyed():
    u = masking.counter_uniform(0, 0, torch.arange(64), (1000,))
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert float((hist - 0.1).abs().max()) < 0.005
    # Neighbouring elements, samples, steps and seeds are uncorrelated.
    assert abs(float(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1])) < 0.02
    base = masking.counter_uniform(0, 0, torch.arange(4), (100,))
    for other in (
        masking.counter_uniform(1, 0, torch.arange(4), (100,)),
        masking.counter_uniform(0, 1, torch.arange(4), (100,)),
        masking.counter_uniform(0, 0, torch.arange(4) + 4, (100,)),
    ):
        assert float((base == other).float().mean()) < 0.01
    # Large (64-bit) seeds, steps and indices are folded in, not truncated.
    big = masking.counter_uniform(2**40, 0, torch.tensor([2**33]), (50,))
    assert not torch.equal(big, masking.counter_uniform(0, 0, torch.tensor([2**33]), (50,)))
    assert not torch.equal(big, masking.counter_uniform(2**40, 0, torch.tensor([0]), (50,)))


# ---------------------------------------------------------------------------------------------- HOG


def _half_flat_half_textured(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) normalised images: a flat grey left half, a random texture right half."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.full((n, 3, size, size), 0.5)
    texture = torch.rand(n, 1, size // 4, size // 4, generator=g)
    imgs[..., size // 2 :] = F.interpolate(texture, scale_factor=4, mode="nearest")[..., size // 2 :]
    imgs = imgs + 0.004 * torch.randn(imgs.shape, generator=g)  # sensor noise on the flat half as well
    return (imgs - 0.45) / 0.226


def _textured_half(size: int = 224, p: int = 16) -> torch.Tensor:
    """(L,) bool: patches in the right half of the image."""
    cols = torch.arange((size // p) ** 2) % (size // p)
    return cols >= (size // p) // 2


def test_hog_scores_prefer_texture():
    imgs = _half_flat_half_textured(4)
    scores = masking.hog_scores(imgs, 16, pixel_std=[0.226] * 3)
    assert scores.shape == (4, 196)
    right = _textured_half()
    assert float(scores[:, right].min()) > 0.9
    cols = torch.arange(196) % 14
    # Flat patches score low despite the sensor noise; column 6 touches the texture at its right edge.
    assert float(scores[:, cols < 6].max()) < 0.2
    assert float(scores[:, cols == 6].max()) < float(scores[:, right].min())


def test_semantic_draw_lands_on_texture_and_uniform_does_not():
    imgs = _half_flat_half_textured(16)
    right = _textured_half()
    noise = masking.counter_uniform(0, 0, torch.arange(16), (4, 196))
    embeddings = torch.randn(16, 196, 32, generator=torch.Generator().manual_seed(1))
    for score, lo, hi in (("hog", 0.8, 1.0), ("uniform", 0.35, 0.65)):
        if score == "hog":
            scores = masking.hog_scores(imgs, 16, pixel_std=[0.226] * 3)
        else:
            scores = masking.uniform_scores(imgs, 16)
        visible = masking.psts_select(
            masking.selection_keys(scores, noise[:, 0]), embeddings, 29, 1.0, noise[:, 1:3]
        )
        semantic_half = visible[:, : 29 // 2]  # the semantic draw; the rest is random at progress 1
        frac = float(right[semantic_half].float().mean())
        assert lo <= frac <= hi, (score, frac)
        targets = masking.sample_targets(masking.selection_keys(scores, noise[:, 3]), visible, 49)
        frac_targets = float(right[targets].float().mean())
        assert lo - 0.05 <= frac_targets <= hi, (score, frac_targets)


def test_hog_flat_patches_keep_a_floor():
    scores = masking.hog_scores(_half_flat_half_textured(1), 16, pixel_std=[0.226] * 3)
    probs = masking.semantic_log_probs(scores).exp()
    ratio = float(probs.max() / probs.min())
    assert 10.0 < ratio <= math.exp(1 / masking.SEMANTIC_TEMPERATURE) + 1e-3


def _reference_hog_score(img: np.ndarray, p: int, cell: int, nbins: int, eps: float) -> np.ndarray:
    """Loop-by-loop HOG block score of one (C, H, W) image already on the pixel scale, for checking."""
    C, H, W = img.shape
    pad = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = np.zeros((C, H, W))
    gy = np.zeros((C, H, W))
    for y in range(H):
        for x in range(W):
            win = pad[:, y : y + 3, x : x + 3]
            gx[:, y, x] = ((win[:, :, 2] - win[:, :, 0]) * [1, 2, 1]).sum(-1) / 8
            gy[:, y, x] = ((win[:, 2, :] - win[:, 0, :]) * [1, 2, 1]).sum(-1) / 8
    r = (np.arange(p) + 0.5 - p / 2) / (p / 2)
    w1 = np.exp(-0.5 * r**2)
    window = np.outer(w1, w1)
    window /= window.mean()
    k = p // cell
    gh, gw = H // p, W // p
    hist = np.zeros((gh, gw, k, k, nbins))
    for y in range(H):
        for x in range(W):
            mags = np.hypot(gx[:, y, x], gy[:, y, x])
            c = int(np.argmax(mags))
            m = mags[c] * window[y % p, x % p]
            theta = math.atan2(gy[c, y, x], gx[c, y, x]) % math.pi
            pos = theta * nbins / math.pi - 0.5
            lo = math.floor(pos)
            f = pos - lo
            cell_idx = (y // p, x // p, (y % p) // cell, (x % p) // cell)
            hist[cell_idx + (lo % nbins,)] += m * (1 - f)
            hist[cell_idx + ((lo + 1) % nbins,)] += m * f
    hist /= cell * cell
    energy = np.sqrt((hist.reshape(gh * gw, -1) ** 2).sum(-1))
    return energy / np.sqrt(energy**2 + eps**2)


@pytest.mark.parametrize("channels", [1, 3])
def test_hog_scores_match_a_loop_reference(channels):
    g = torch.Generator().manual_seed(channels)
    img = torch.rand(1, channels, 32, 32, generator=g)
    img[..., :16, :16] = 0.3  # one flat patch
    img[..., 16:, :] = torch.linspace(0, 1, 32)  # a smooth ramp: a single orientation
    eps = 0.05
    got = masking.hog_scores(img, 16, pixel_std=None, cell_size=8, eps=eps)[0].double().numpy()
    want = _reference_hog_score(img[0].double().numpy(), 16, 8, 9, eps)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_hog_scores_handle_other_patch_sizes_and_bands():
    assert masking.hog_scores(torch.randn(2, 4, 28, 42), 14).shape == (2, 6)  # 2 x 7 px cells
    assert masking.hog_scores(torch.randn(2, 1, 32, 32), 8).shape == (2, 16)
    with pytest.raises(ValueError, match="patches"):
        masking.hog_scores(torch.randn(1, 3, 30, 32), 16)


# ---------------------------------------------------------------------------------------------- sampling


def test_gumbel_topk_follows_the_distribution():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    n = 20000
    u = masking.counter_uniform(5, 0, torch.arange(n), (4,))
    first = masking.gumbel_topk(p.log().expand(n, 4), 1, u)[:, 0]
    freq = torch.bincount(first, minlength=4).float() / n
    assert torch.allclose(freq, p, atol=0.015)
    picks = masking.gumbel_topk(p.log().expand(n, 4), 3, u)
    assert bool((picks.sort(-1).values.diff(dim=-1) > 0).all())  # without replacement


def test_sample_targets_avoid_visible_patches():
    n, L = 6, 196
    noise = masking.counter_uniform(1, 0, torch.arange(n), (4, L))
    scores = torch.zeros(n, L)
    keys = masking.selection_keys(scores, noise[:, 0])
    visible = masking.psts_select(keys, torch.randn(n, L, 16), 29, 0.2, noise[:, 1:3])
    targets = masking.sample_targets(masking.selection_keys(scores, noise[:, 3]), visible, 49)
    assert targets.shape == (n, 49)
    for v, t in zip(visible.tolist(), targets.tolist(), strict=True):
        assert len(set(v)) == 29 and len(set(t)) == 49 and not set(v) & set(t)


def test_random_masking_partitions_the_patches():
    u = masking.counter_uniform(0, 0, torch.arange(3), (196,))
    visible, masked = masking.random_masking(u, 49)
    assert visible.shape == (3, 49) and masked.shape == (3, 147)
    assert torch.equal(torch.cat([visible, masked], 1).sort(-1).values, torch.arange(196).expand(3, -1))


# ---------------------------------------------------------------------------------------------- PSTS


@pytest.mark.parametrize(
    ("progress", "expected"),
    [
        (0.0, (1.0, 0.0, 0.0)),
        (0.349, (1.0, 0.0, 0.0)),
        (0.35, (1.0, 0.0, 0.0)),
        (0.3625, (0.5, 0.5, 0.0)),
        (0.375, (0.0, 1.0, 0.0)),
        (0.5, (0.0, 1.0, 0.0)),
        (0.725, (0.0, 1.0, 0.0)),
        (0.73125, (0.0, 0.75, 0.25)),
        (0.75, (0.0, 0.0, 1.0)),
        (1.0, (0.0, 0.0, 1.0)),
    ],
)
def test_psts_stage_weights(progress, expected):
    got = masking.psts_stage_weights(progress)
    assert got == pytest.approx(expected, abs=1e-9)
    assert sum(got) == pytest.approx(1.0)


def test_psts_stage_weights_follow_the_given_stages_and_refuse_bad_ones():
    assert masking.psts_stage_weights(0.15, (0.1, 0.2, 0.3, 0.4)) == pytest.approx((0.5, 0.5, 0.0))
    assert masking.psts_stage_weights(0.5, (0.5, 0.5, 0.5, 0.5)) == (0.0, 0.0, 1.0)  # hard switches
    with pytest.raises(ValueError, match="psts_stages"):
        masking.psts_stage_weights(0.5, (0.4, 0.3, 0.6, 0.7))


def test_expansion_counts_split_like_the_reference():
    assert masking.expansion_counts(7, (1.0, 0.0, 0.0)) == (7, 0, 0)
    assert masking.expansion_counts(8, (0.5, 0.5, 0.0)) == (4, 4, 0)
    assert masking.expansion_counts(7, (0.5, 0.5, 0.0)) == (3, 4, 0)
    assert masking.expansion_counts(8, (0.0, 0.25, 0.75)) == (0, 2, 6)
    assert masking.expansion_counts(7, (0.0, 0.0, 1.0)) == (0, 0, 7)


def _fan_of_patches(n: int = 2, L: int = 16):
    """Patches 0-3 certain to be drawn first; the others' embeddings turn away from them by 8 degrees each."""
    keys = torch.full((n, L), -1e4)
    keys[:, :4] = 0.0
    angle = torch.zeros(L)
    angle[4:] = torch.arange(1, L - 3) * math.radians(8)
    emb = torch.stack([angle.cos(), angle.sin()], -1).expand(n, L, 2)  # (n, L, 2)
    noise = masking.counter_uniform(3, 0, torch.arange(n), (2, L))
    return keys, emb, noise


def test_psts_near_stage_adds_the_most_similar_patches():
    keys, emb, noise = _fan_of_patches()
    visible = masking.psts_select(keys, emb, 8, 0.1, noise)  # 4 drawn, then 2 + 2 near
    assert sorted(visible[0, :4].tolist()) == [0, 1, 2, 3]
    assert visible[:, 4:6].sort(-1).values.tolist() == [[4, 5]] * 2
    assert visible[:, 6:].sort(-1).values.tolist() == [[6, 7]] * 2


def test_psts_far_stage_adds_the_least_similar_patches():
    keys, emb, noise = _fan_of_patches()
    visible = masking.psts_select(keys, emb, 8, 0.5, noise)
    assert visible[:, 4:6].sort(-1).values.tolist() == [[14, 15]] * 2
    # Step 2 measures similarity to everything selected so far: the middle of the fan is now farthest.
    assert visible[:, 6:].sort(-1).values.tolist() == [[8, 9]] * 2


def test_psts_random_stage_follows_the_noise():
    keys, emb, noise = _fan_of_patches()
    visible = masking.psts_select(keys, emb, 8, 1.0, noise)
    free = torch.ones(16, dtype=torch.bool)
    free[:4] = False
    for row in range(2):
        step1 = noise[row, 0].masked_fill(~free, -1).topk(2).indices
        assert sorted(visible[row, 4:6].tolist()) == sorted(step1.tolist())
        free[step1] = False
        step2 = noise[row, 1].masked_fill(~free, -1).topk(2).indices
        assert sorted(visible[row, 6:].tolist()) == sorted(step2.tolist())
        free[:] = True
        free[:4] = False
    # Blending near -> far: half of each step from each end.
    blended = masking.psts_select(keys, emb, 8, 0.3625, noise)
    assert blended[:, 4:6].sort(-1).values.tolist() == [[4, 15]] * 2


def test_psts_counts_split_the_visible_patches_as_the_reference():
    assert masking.psts_counts(29) == (14, 7, 8)  # ViT-B/16 at 224 px, mask ratio 0.85
    assert masking.psts_counts(9) == (4, 2, 3)  # 128 px: 64 patches
    assert masking.psts_counts(38) == (19, 9, 10)  # ViT-H/14
    assert masking.psts_counts(1) == (0, 0, 1)


def test_topk_selection_takes_the_highest_scores_and_breaks_ties_at_random():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.8, 0.2, 0.7]])
    u = masking.counter_uniform(0, 0, torch.arange(1), (6,))
    keys = masking.selection_keys(scores, u, "topk")
    assert sorted(masking.top_keys(keys, 3)[0].tolist()) == [1, 3, 5]
    # Uniform scores: every patch equally likely, not the first ones.
    n = 4000
    u = masking.counter_uniform(1, 0, torch.arange(n), (16,))
    first = masking.top_keys(masking.selection_keys(torch.zeros(n, 16), u, "topk"), 1)[:, 0]
    freq = torch.bincount(first, minlength=16).float() / n
    assert float((freq - 1 / 16).abs().max()) < 0.02
    with pytest.raises(ValueError, match="selection"):
        masking.selection_keys(scores, u[:1, :6], "greedy")


def test_sampling_temperature_sharpens_the_draw():
    # Scores 1 and 0: the first patch is drawn first with probability e^(1/T) / (e^(1/T) + 1).
    n = 20000
    scores = torch.tensor([[1.0, 0.0]]).expand(n, 2)
    u = masking.counter_uniform(2, 0, torch.arange(n), (2,))
    for temperature in (1.0, 1 / 3, 0.1):
        first = masking.top_keys(masking.selection_keys(scores, u, "sample", temperature), 1)[:, 0]
        want = math.exp(1 / temperature) / (math.exp(1 / temperature) + 1)
        assert float((first == 0).float().mean()) == pytest.approx(want, abs=0.01), temperature
