"""The pretraining models at miniature size: token counts, the timm seam, determinism, learning."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch

from rspretrain import masking
from rspretrain.model import ARCHS, ModelConfig, ModelConfigError, PretrainModel, build_model


def tiny(method: str = "selectivemae", img_size: int = 64, **kw) -> ModelConfig:
    base = dict(
        method=method,
        arch="vit_tiny_patch16",
        img_size=img_size,
        depth=2,
        embed_dim=64,
        num_heads=2,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=2,
    )
    base.update(kw)
    return ModelConfig(**base)


def images(n: int, size: int = 64, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models are latency-bound: one thread is faster and does not stall when other jobs share the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fixed_noise(model: PretrainModel, n: int, step: int = 0) -> torch.Tensor:
    return masking.counter_uniform(0, step, torch.arange(n), (model.noise_channels, model.num_patches))


@pytest.mark.parametrize(
    ("method", "arch", "visible", "targets", "decoder_depth"),
    [
        ("selectivemae", "vit_base_patch16", 29, 49, 12),
        ("mae", "vit_base_patch16", 49, 147, 8),
        ("selectivemae", "vit_huge_patch14", 38, 64, 12),
    ],
)
def test_token_counts_of_the_real_architectures(method, arch, visible, targets, decoder_depth):
    with torch.device("meta"):  # full-size modules without allocating or initialising weights
        model = build_model(ModelConfig(method=method, arch=arch))
    assert (model.num_visible, model.num_targets) == (visible, targets)
    assert len(model.decoder.blocks) == decoder_depth
    assert model.encoder.pos_embed.shape == (1, 1 + model.num_patches, ARCHS[arch]["embed_dim"])


@pytest.mark.parametrize("method", ["selectivemae", "mae"])
def test_forward_shapes_and_finite_gradients(method):
    model = build_model(tiny(method, img_size=224))  # 196 patches, tiny widths
    out = model(images(2, 224), progress=0.3, noise=fixed_noise(model, 2))
    V, K = (29, 49) if method == "selectivemae" else (49, 147)
    assert out.visible_index.shape == (2, V) and out.target_index.shape == (2, K)
    assert out.pred.shape == (2, K, 16 * 16 * 3)
    for v, t in zip(out.visible_index.tolist(), out.target_index.tolist(), strict=True):
        assert len(set(v)) == V and len(set(t)) == K and not set(v) & set(t)
    assert (out.scores is None) == (method == "mae")
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert float(model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("method", ["selectivemae", "mae"])
def test_bfloat16_autocast_forward_and_backward(method):
    model = build_model(tiny(method))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(2), progress=0.5, noise=fixed_noise(model, 2))
    assert out.pred.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(("img_size", "in_chans"), [(32, 3), (64, 3), (64, 4)])
def test_encoder_loads_strictly_into_timm_and_matches_its_features(img_size, in_chans):
    # MAE: at 32 px (4 patches) SelectiveMAE's 0.85 mask ratio would leave no patch visible.
    cfg = ModelConfig(method="mae", arch="vit_tiny_patch16", img_size=img_size, in_chans=in_chans)
    model = build_model(cfg).eval()
    ref = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=img_size, in_chans=in_chans
    ).eval()
    ref.load_state_dict(model.encoder.state_dict(), strict=True)
    x = images(2, img_size, in_chans)
    with torch.no_grad():
        ours, theirs = model.encode(x), ref.forward_features(x)
    assert ours.shape == (2, 1 + (img_size // 16) ** 2, 192)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_position_embeddings_are_fixed_sincos():
    model = build_model(tiny())
    pos = model.encoder.pos_embed
    assert "encoder.pos_embed" not in dict(model.named_parameters())  # a buffer: never trained
    assert torch.equal(pos[0, 0], torch.zeros(64))
    assert float(pos[0, 1:].abs().max()) <= 1.0
    assert torch.allclose(pos[0, 1:].square().sum(-1), torch.full((16,), 32.0))  # D/2 (sin, cos) pairs
    names = dict(model.named_parameters()) | dict(model.named_buffers())
    assert model.no_weight_decay() <= set(names)


@pytest.mark.parametrize("method", ["selectivemae", "mae"])
def test_identical_noise_gives_identical_loss(method):
    model = build_model(tiny(method))
    x = images(4)
    a = model(x, progress=0.5, noise=fixed_noise(model, 4))
    b = model(x, progress=0.5, noise=fixed_noise(model, 4))
    assert torch.equal(a.visible_index, b.visible_index)
    assert torch.equal(a.target_index, b.target_index)
    assert torch.equal(a.loss, b.loss)
    c = model(x, progress=0.5, noise=fixed_noise(model, 4, step=1))
    assert not torch.equal(a.visible_index, c.visible_index)


def test_masks_of_a_sample_do_not_depend_on_its_batch():
    model = build_model(tiny(img_size=224))
    x = images(4, 224)
    noise = fixed_noise(model, 4)
    whole = model(x, progress=0.6, noise=noise)
    half = model(x[2:], progress=0.6, noise=noise[2:])
    assert torch.equal(whole.visible_index[2:], half.visible_index)
    assert torch.equal(whole.target_index[2:], half.target_index)


def test_scores_follow_the_score_setting():
    x = images(2, 224)
    hog = build_model(tiny(img_size=224))(x, progress=0.0)
    uniform = build_model(tiny(img_size=224, score="uniform"))(x, progress=0.0)
    assert hog.scores is not None and uniform.scores is not None
    assert float(hog.scores.min()) > 0.0
    assert torch.equal(uniform.scores, torch.zeros(2, 196))


@pytest.mark.parametrize("method", ["selectivemae", "mae"])
def test_loss_falls_when_overfitting_one_batch(method):
    torch.manual_seed(0)
    model = build_model(tiny(method))
    x = images(4)
    noise = fixed_noise(model, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        out = model(x, progress=0.1, noise=noise)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.85 * losses[0], losses


def test_gradient_checkpointing_changes_nothing_but_memory():
    torch.manual_seed(0)
    plain = build_model(tiny())
    ckpt = build_model(dataclasses.replace(tiny(), grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = images(2)
    losses = []
    for model in (plain, ckpt):
        out = model(x, progress=0.5, noise=fixed_noise(model, 2))
        out.loss.backward()
        losses.append(out.loss)
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(
        plain.encoder.blocks[0].mlp.fc1.weight.grad, ckpt.encoder.blocks[0].mlp.fc1.weight.grad
    )


def test_patchify_round_trip_with_any_band_count():
    model = build_model(tiny(in_chans=5))
    x = images(2, 64, 5)
    patches = model.patchify(x)
    assert patches.shape == (2, 16, 16 * 16 * 5)
    assert torch.equal(patches[0, 1, :5], x[0, :, 0, 16])  # patch (0, 1), pixel (0, 0), all bands
    assert torch.equal(model.unpatchify(patches), x)
    assert torch.isfinite(model(x, progress=0.9).loss)


def test_loss_is_the_normalised_pixel_mse_of_the_targets():
    model = build_model(tiny())
    x = images(2)
    out = model(x, progress=0.5, noise=fixed_noise(model, 2))
    target = model.patchify(x).gather(1, out.target_index[:, :, None].expand(-1, -1, 768))
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(out.loss, (out.pred - target).square().mean())


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (dict(arch="vit_gigantic"), "model.arch"),
        (dict(img_size=70), "model.img_size"),
        (dict(method="simmim"), "model.method"),
        (dict(score="entropy"), "model.score"),
        (dict(kept_mask_ratio=0.95), "kept_mask_ratio"),
        (dict(img_size=32), "mask_ratio"),
        (dict(psts_stages=(0.5, 0.4, 0.6, 0.7)), "psts_stages"),
        (dict(selection="greedy"), "model.selection"),
        (dict(psts_features="pixels"), "model.psts_features"),
        (dict(decoder_kv="fused"), "model.decoder_kv"),
        (dict(semantic_temperature=0.0), "model.semantic_temperature"),
        (dict(hog_eps=-1.0), "model.hog_eps"),
        (dict(decoder_embed_dim=66, decoder_num_heads=4), "model.decoder_embed_dim"),
    ],
)
def test_bad_settings_name_the_key(change, key):
    with pytest.raises(ModelConfigError, match=key):
        build_model(dataclasses.replace(tiny(), **change))


def test_noise_of_the_wrong_shape_is_refused():
    model = build_model(tiny())
    with pytest.raises(ValueError, match=r"\(N, R, L\)"):
        model(images(2), progress=0.0, noise=torch.rand(2, 1, 16))


@pytest.mark.parametrize("decoder_kv", ["per_block", "shared"])
def test_decoder_keys_and_values_come_from_the_chosen_width(decoder_kv):
    model = build_model(tiny(embed_dim=96, num_heads=2, decoder_embed_dim=32, decoder_kv=decoder_kv))
    names = {name for name, _ in model.named_parameters()}
    kv = model.decoder.blocks[0].attn.kv
    if decoder_kv == "per_block":  # the reference: every block reads the 96-wide encoder tokens
        assert (kv.in_features, kv.out_features) == (96, 64)
        assert not any(name.startswith("decoder.decoder_embed") for name in names)
    else:  # one 96 -> 32 projection shared by every block
        assert (kv.in_features, kv.out_features) == (32, 64)
        assert model.decoder.decoder_embed.weight.shape == (32, 96)
    out = model(images(2), progress=0.5, noise=fixed_noise(model, 2))
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_decoder_presets_follow_the_reference_per_arch():
    small = ModelConfig(arch="vit_small_patch16")
    base = ModelConfig(arch="vit_base_patch16")
    assert (small.effective_decoder_embed_dim, small.effective_decoder_num_heads) == (256, 8)
    assert (base.effective_decoder_embed_dim, base.effective_decoder_num_heads) == (512, 16)
    assert ModelConfig(arch="vit_small_patch16", decoder_embed_dim=128).effective_decoder_embed_dim == 128


def test_topk_selection_without_psts_sees_the_most_textured_patches():
    # Left half flat, right half textured: top-k picks visible and target patches from the texture only.
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 3, 128, 128)
    x[..., 64:] = torch.randn(2, 3, 128, 64, generator=g)
    model = build_model(tiny(img_size=128, selection="topk", psts=False, mask_ratio=0.75))
    out = model(x, progress=0.0, noise=fixed_noise(model, 2))
    right = torch.arange(64) % 8 >= 4  # (L,) patches of the textured half
    assert bool(right[out.visible_index].all()) and bool(right[out.target_index].all())
    assert out.visible_index.shape == (2, 16) and out.target_index.shape == (2, 16)
    # Sampling at the default temperature keeps some flat patches in play.
    sampled = build_model(tiny(img_size=128, psts=False, mask_ratio=0.75))
    out = sampled(x, progress=0.0, noise=fixed_noise(sampled, 2))
    assert 0.5 < float(right[out.target_index].float().mean()) < 1.0


def test_psts_off_draws_every_visible_patch_from_the_semantic_keys():
    model = build_model(tiny(img_size=128, psts=False, score="uniform"))
    noise = fixed_noise(model, 2)
    out = model(images(2, 128), progress=0.0, noise=noise)
    keys = masking.selection_keys(torch.zeros(2, 64), noise[:, 0])
    assert torch.equal(out.visible_index, keys.topk(model.num_visible, -1).indices)
