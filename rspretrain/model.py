"""SelectiveMAE and MAE pretraining models: only nn.Modules, their config and the ARCHS presets.

The encoder is a ViT assembled from timm's ``PatchEmbed`` and ``Block`` whose parameter names are those
of timm's ``VisionTransformer``, so ``encoder.state_dict()`` loads with strict=True into
``timm.create_model(f"{arch}_{img_size}", num_classes=0)``. Which patches it sees and which it must
reconstruct is decided in ``rspretrain.masking`` (pure tensor functions); this module only wires them.

Shapes: N batch, C channels, H/W pixels, p patch size, L patches, D encoder width, E decoder width,
V visible patches, K reconstructed patches, T = 1 + V encoder tokens, P = p * p * C pixels per patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm, Mlp, PatchEmbed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from rspretrain import masking

# Encoder presets, named as timm's VisionTransformer models without the image-size suffix.
ARCHS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0),
}
METHODS = ("selectivemae", "mae")
SCORES = ("hog", "uniform")
SELECTIONS = ("sample", "topk")
PSTS_FEATURES = ("patch_pos", "patch")
DECODER_KV = ("per_block", "shared")
# Decoder presets of the reference code (SelectiveMAE's models_*.py): width 256 with 8 heads for ViT-S,
# 512 with 16 heads for every larger encoder (facebookresearch/mae's only preset).
_SMALL_DECODER = ("vit_small_patch16",)


class _LayerNorm(LayerNorm):
    """timm's LayerNorm with the eps of its ViTs (1e-6), so encode() matches timm bit for bit."""

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        super().__init__(num_features, eps=1e-6, **kwargs)


_norm_layer = _LayerNorm


class ModelConfigError(ValueError):
    """A model setting a user can get wrong; the message names the key and what to change."""


@dataclass
class ModelConfig:
    method: str = "selectivemae"  # "selectivemae" | "mae"
    arch: str = "vit_base_patch16"
    img_size: int = 224
    in_chans: int = 3
    mask_ratio: float | None = None  # None -> 0.85 for selectivemae, 0.75 for mae
    kept_mask_ratio: float = 0.25  # selectivemae: reconstruct floor(L * this) of the masked patches
    decoder_embed_dim: int | None = None  # None -> 256 for vit_small, else 512 (the references' presets)
    decoder_depth: int | None = None  # None -> 12 for selectivemae, 8 for mae
    decoder_num_heads: int | None = None  # None -> 8 for vit_small, else 16
    # selectivemae: "per_block" projects each decoder block's keys and values from the encoder width, as the
    # reference and CrossMAE do; "shared" first maps the encoder tokens to the decoder width once (decoder_embed).
    decoder_kv: str = "per_block"
    norm_pix_loss: bool = True
    score: str = "hog"  # "hog" | "uniform" (uniform reproduces the reference code's behaviour)
    selection: str = "sample"  # "sample" from softmax(score / temperature) | "topk": the highest scores
    semantic_temperature: float = masking.SEMANTIC_TEMPERATURE
    hog_eps: float = masking.HOG_EPS  # HOG block-normalisation constant (masking.hog_scores)
    psts: bool = True  # False: every visible patch comes from the semantic selection, no similarity expansion
    # Features PSTS ranks by cosine similarity: "patch_pos" = patch embedding + position (the reference),
    # "patch" = the patch embedding alone (appearance only).
    psts_features: str = "patch_pos"
    psts_stages: tuple[float, float, float, float] = masking.DEFAULT_PSTS_STAGES
    depth: int | None = None  # overrides of the preset, for tiny test models
    embed_dim: int | None = None
    num_heads: int | None = None
    drop_path: float = 0.0
    grad_checkpointing: bool = False

    @property
    def effective_mask_ratio(self) -> float:
        if self.mask_ratio is not None:
            return self.mask_ratio
        return 0.85 if self.method == "selectivemae" else 0.75

    @property
    def effective_decoder_depth(self) -> int:
        if self.decoder_depth is not None:
            return self.decoder_depth
        return 12 if self.method == "selectivemae" else 8

    @property
    def effective_decoder_embed_dim(self) -> int:
        if self.decoder_embed_dim is not None:
            return self.decoder_embed_dim
        return 256 if self.arch in _SMALL_DECODER else 512

    @property
    def effective_decoder_num_heads(self) -> int:
        if self.decoder_num_heads is not None:
            return self.decoder_num_heads
        return 8 if self.arch in _SMALL_DECODER else 16

    def encoder_dims(self) -> dict[str, Any]:
        """The preset with the depth / embed_dim / num_heads overrides applied."""
        if self.arch not in ARCHS:
            raise ModelConfigError(f"model.arch={self.arch!r} is unknown; use one of {sorted(ARCHS)}")
        dims = dict(ARCHS[self.arch])
        for key in ("depth", "embed_dim", "num_heads"):
            if getattr(self, key) is not None:
                dims[key] = getattr(self, key)
        return dims

    def validate(self) -> None:
        """Raise ModelConfigError naming the first inconsistent setting."""
        if self.method not in METHODS:
            raise ModelConfigError(f"model.method={self.method!r} is unknown; use one of {METHODS}")
        for key, choices in (
            ("score", SCORES),
            ("selection", SELECTIONS),
            ("psts_features", PSTS_FEATURES),
            ("decoder_kv", DECODER_KV),
        ):
            if getattr(self, key) not in choices:
                raise ModelConfigError(f"model.{key}={getattr(self, key)!r} is unknown; use one of {choices}")
        if not self.semantic_temperature > 0:
            raise ModelConfigError(f"model.semantic_temperature={self.semantic_temperature} must be positive")
        if not self.hog_eps > 0:
            raise ModelConfigError(f"model.hog_eps={self.hog_eps} must be positive")
        dims = self.encoder_dims()
        p = dims["patch_size"]
        if self.img_size % p:
            raise ModelConfigError(f"model.img_size={self.img_size} must be a multiple of the patch size {p}")
        if self.in_chans < 1:
            raise ModelConfigError(f"model.in_chans={self.in_chans} must be at least 1")
        if dims["embed_dim"] % dims["num_heads"] or dims["embed_dim"] % 4:
            raise ModelConfigError(
                f"model.embed_dim={dims['embed_dim']} must be divisible by num_heads={dims['num_heads']} and by 4"
            )
        e, h = self.effective_decoder_embed_dim, self.effective_decoder_num_heads
        if h < 1 or e % h or e % 4:
            raise ModelConfigError(
                f"model.decoder_embed_dim={e} must be divisible by decoder_num_heads={h} and by 4"
            )
        if self.effective_decoder_depth < 1:
            raise ModelConfigError(f"model.decoder_depth={self.decoder_depth} must be at least 1")
        if not 0.0 <= self.drop_path < 1.0:
            raise ModelConfigError(f"model.drop_path={self.drop_path} must be in [0, 1)")
        num_patches = (self.img_size // p) ** 2
        try:
            v = masking.num_visible_patches(num_patches, self.effective_mask_ratio)
            if self.method == "selectivemae":
                masking.num_target_patches(num_patches, self.kept_mask_ratio, v)
                masking.psts_stage_weights(0.0, self.psts_stages)
        except ValueError as e:
            raise ModelConfigError(f"model: {e}") from e


@dataclass
class PretrainOutput:
    loss: Tensor  # scalar
    pred: Tensor  # (N, K, P) reconstructions of the K target patches
    target_index: Tensor  # (N, K) int64 patch indices reconstructed
    visible_index: Tensor  # (N, V) int64 patch indices fed to the encoder
    scores: Tensor | None  # (N, L) semantic score per patch (selectivemae), None for mae


def _sincos_pos_embed(grid_size: tuple[int, int], dim: int, cls_token: bool) -> Tensor:
    """Fixed 2D sin-cos position embedding, (1, [1 +] L, dim); the class token's row is zero (as MAE)."""
    pos = build_sincos2d_pos_embed(list(grid_size), dim=dim, interleave_sin_cos=True)  # (L, dim)
    if cls_token:
        pos = torch.cat([torch.zeros(1, dim), pos], dim=0)  # (1 + L, dim)
    return pos[None]


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """(N, L, D) tokens, (N, K) indices -> (N, K, D)."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


class ViTEncoder(nn.Module):
    """ViT encoder with timm VisionTransformer parameter names and a fixed sin-cos pos_embed buffer."""

    pos_embed: Tensor  # (1, 1 + L, D)

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # A buffer, not a frozen Parameter: fixed values, still in state_dict under timm's name, and no
        # requires_grad=False parameter for FSDP to trip over.
        self.register_buffer("pos_embed", _sincos_pos_embed(self.patch_embed.grid_size, embed_dim, True))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=r, norm_layer=_norm_layer)
                for r in rates
            ]
        )
        self.norm = _norm_layer(embed_dim)
        self.grad_checkpointing = grad_checkpointing

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def embed_patches(self, imgs: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, L, D) patch embeddings, before positions."""
        return self.patch_embed(imgs)

    def forward_tokens(self, patches: Tensor, index: Tensor | None = None) -> Tensor:
        """Patch embeddings (N, L, D), optional kept indices (N, V) -> normalised tokens (N, 1 + V, D)."""
        x = patches + self.pos_embed[:, 1:]  # (N, L, D)
        if index is not None:
            x = _gather_tokens(x, index)  # (N, V, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (N, 1, D)
        x = torch.cat([cls, x], dim=1)  # (N, T, D)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for blk in self.blocks:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, imgs: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, 1 + L, D): all tokens, no masking (timm's forward_features)."""
        return self.forward_tokens(self.embed_patches(imgs))


class CrossAttention(nn.Module):
    """Queries from the decoder (width E), keys and values from the context tokens (width Dc); fused SDPA."""

    def __init__(
        self, dim: int, num_heads: int, context_dim: int | None = None, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        N, K, E = x.shape
        T = context.shape[1]
        h = self.num_heads
        q = self.q(x).view(N, K, h, E // h).transpose(1, 2)  # (N, h, K, E/h)
        kv = self.kv(context).view(N, T, 2, h, E // h).permute(2, 0, 3, 1, 4)  # (2, N, h, T, E/h)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (N, h, K, E/h)
        return self.proj(out.transpose(1, 2).reshape(N, K, E))  # (N, K, E)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention + MLP; the queries do not attend to each other.

    The context (the encoder's final, already normalised tokens) is not normalised again, as in the reference.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None
    ) -> None:
        super().__init__()
        self.norm1 = _norm_layer(dim)
        self.attn = CrossAttention(dim, num_heads, context_dim)
        self.norm2 = _norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), context)
        return x + self.mlp(self.norm2(x))


class CrossAttentionDecoder(nn.Module):
    """SelectiveMAE decoder: one query per patch to reconstruct, attending to the encoder tokens only.

    The queries (mask token + fixed position of the target patch) never attend to each other, so the
    cost grows with K * T, not with L^2 as in MAE's decoder, and patches that are neither visible nor
    targets cost nothing. With ``kv="per_block"`` (the reference's and CrossMAE's layout) every block
    projects its keys and values from the encoder width D; with ``kv="shared"`` the encoder tokens are first
    mapped to the decoder width once (``decoder_embed``, D -> E) and every block reads that.
    """

    decoder_pos_embed: Tensor  # (1, L, E)

    def __init__(
        self,
        grid_size: tuple[int, int],
        encoder_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        patch_dim: int,
        mlp_ratio: float = 4.0,
        kv: str = "per_block",
    ) -> None:
        super().__init__()
        self.decoder_embed: nn.Module = nn.Linear(encoder_dim, dim) if kv == "shared" else nn.Identity()
        context_dim = dim if kv == "shared" else encoder_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos_embed", _sincos_pos_embed(grid_size, dim, False))  # (1, L, E)
        self.blocks = nn.ModuleList(
            [CrossAttentionBlock(dim, num_heads, mlp_ratio, context_dim) for _ in range(depth)]
        )
        self.decoder_norm = _norm_layer(dim)
        self.decoder_pred = nn.Linear(dim, patch_dim)

    def forward(self, latent: Tensor, target_index: Tensor) -> Tensor:
        """Encoder tokens (N, T, D), targets (N, K) -> predicted pixels (N, K, P)."""
        context = self.decoder_embed(latent)  # (N, T, E) shared, or (N, T, D) per block
        pos = self.decoder_pos_embed.expand(latent.shape[0], -1, -1)  # (N, L, E)
        x = self.mask_token + _gather_tokens(pos, target_index)  # (N, K, E)
        for blk in self.blocks:
            x = blk(x, context)
        return self.decoder_pred(self.decoder_norm(x))  # (N, K, P)


class MAEDecoder(nn.Module):
    """MAE's decoder (He et al.): timm self-attention blocks over the class token and all L patches."""

    decoder_pos_embed: Tensor  # (1, 1 + L, E)

    def __init__(
        self,
        grid_size: tuple[int, int],
        encoder_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        patch_dim: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos_embed", _sincos_pos_embed(grid_size, dim, True))  # (1, 1 + L, E)
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_norm_layer) for _ in range(depth)]
        )
        self.decoder_norm = _norm_layer(dim)
        self.decoder_pred = nn.Linear(dim, patch_dim)

    def forward(self, latent: Tensor, visible_index: Tensor, target_index: Tensor) -> Tensor:
        """Encoder tokens (N, T, D), visible (N, V) and target (N, K) indices -> pixels (N, K, P)."""
        x = self.decoder_embed(latent)  # (N, T, E)
        N, _, E = x.shape
        L = self.decoder_pos_embed.shape[1] - 1
        grid = self.mask_token.to(x.dtype).expand(N, L, E)  # (N, L, E); x is bf16 under autocast
        grid = grid.scatter(1, visible_index[:, :, None].expand(-1, -1, E), x[:, 1:])  # visible back in place
        x = torch.cat([x[:, :1], grid], dim=1) + self.decoder_pos_embed  # (N, 1 + L, E)
        x = self.blocks(x)[:, 1:]  # (N, L, E)
        x = _gather_tokens(x, target_index)  # (N, K, E): only the masked patches are predicted
        return self.decoder_pred(self.decoder_norm(x))  # (N, K, P)


class PretrainModel(nn.Module):
    """Encoder + decoder + loss for one method; forward(imgs, progress, noise) -> PretrainOutput."""

    pixel_std: Tensor  # (C,)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        dims = cfg.encoder_dims()
        self.patch_size = p = int(dims["patch_size"])
        self.encoder = ViTEncoder(
            cfg.img_size,
            p,
            cfg.in_chans,
            dims["embed_dim"],
            dims["depth"],
            dims["num_heads"],
            dims["mlp_ratio"],
            cfg.drop_path,
            cfg.grad_checkpointing,
        )
        grid = self.encoder.patch_embed.grid_size
        self.num_patches = L = self.encoder.num_patches
        self.num_visible = masking.num_visible_patches(L, cfg.effective_mask_ratio)
        decoder_args = (
            grid,
            dims["embed_dim"],
            cfg.effective_decoder_embed_dim,
            cfg.effective_decoder_depth,
            cfg.effective_decoder_num_heads,
            p * p * cfg.in_chans,
            dims["mlp_ratio"],
        )
        self.decoder: CrossAttentionDecoder | MAEDecoder
        if cfg.method == "selectivemae":
            self.num_targets = masking.num_target_patches(L, cfg.kept_mask_ratio, self.num_visible)
            self.noise_channels = masking.SELECTIVE_NOISE_CHANNELS
            self.decoder = CrossAttentionDecoder(*decoder_args, kv=cfg.decoder_kv)
        else:
            self.num_targets = L - self.num_visible
            self.noise_channels = masking.MAE_NOISE_CHANNELS
            self.decoder = MAEDecoder(*decoder_args)
        # Images arrive ImageNet-normalised; HOG wants gradients on the pixel scale. Other band counts
        # are assumed normalised with the mean ImageNet std.
        std = IMAGENET_DEFAULT_STD if cfg.in_chans == 3 else (sum(IMAGENET_DEFAULT_STD) / 3,) * cfg.in_chans
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's init: patch_embed like a Linear, xavier Linears, N(0, 0.02) tokens, unit LayerNorms.
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.decoder.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Names exempt from weight decay beyond timm's rule (1-D tensors and biases), for
        param_groups_weight_decay: only the fixed position embeddings (buffers, so never trained anyway).

        cls_token and mask_token are decayed, as in both references' pretraining (facebookresearch/mae's
        add_weight_decay and SelectiveMAE's param_groups_weight_decay are called without a skip list).
        """
        return {"encoder.pos_embed", "decoder.decoder_pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable

    def patchify(self, imgs: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, L, P), pixels ordered (row, col, channel) inside a patch as in MAE."""
        N, C, H, W = imgs.shape
        p = self.patch_size
        x = imgs.reshape(N, C, H // p, p, W // p, p)  # (N, C, h, p, w, p)
        x = x.permute(0, 2, 4, 3, 5, 1)  # (N, h, w, p, p, C)
        return x.reshape(N, (H // p) * (W // p), p * p * C)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, L, P) -> (N, C, H, W) for the square image this model was built for."""
        N, L, P = x.shape
        p, C = self.patch_size, self.cfg.in_chans
        h = w = self.cfg.img_size // p
        x = x.reshape(N, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, p)
        return x.reshape(N, C, h * p, w * p)

    def make_noise(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """(n, R, L) torch.rand noise; the trainer passes masking.counter_uniform noise instead."""
        return torch.rand(n, self.noise_channels, self.num_patches, device=device)

    # Eager even under torch.compile(model): the PSTS counts are Python integers derived from progress,
    # which would guard and recompile the graph at every stage change. It is cheap and leaves a graph
    # break between the patch embedding and the encoder blocks.
    @torch.compiler.disable
    @torch.no_grad()
    def select(
        self, imgs: Tensor, patches: Tensor, progress: float, noise: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Which patches the encoder sees and which are reconstructed.

        imgs (N, C, H, W), patches (N, L, D) patch embeddings, noise (N, R, L) ->
        visible (N, V), targets (N, K), scores (N, L) or None.
        """
        if self.cfg.method == "mae":
            visible, targets = masking.random_masking(noise[:, 0], self.num_visible)
            return visible, targets, None
        cfg = self.cfg
        if cfg.score == "hog":
            scores = masking.hog_scores(imgs, self.patch_size, pixel_std=self.pixel_std, eps=cfg.hog_eps)
        else:
            scores = masking.uniform_scores(imgs, self.patch_size)  # (N, L)

        def keys(channel: int) -> Tensor:  # (N, L): the selection is the largest keys
            return masking.selection_keys(scores, noise[:, channel], cfg.selection, cfg.semantic_temperature)

        if cfg.psts:
            features = patches  # (N, L, D)
            if cfg.psts_features == "patch_pos":
                features = patches + self.encoder.pos_embed[:, 1:]  # what the encoder sees, as the reference
            visible = masking.psts_select(
                keys(0), features, self.num_visible, progress, noise[:, 1:3], cfg.psts_stages
            )
        else:
            visible = masking.top_keys(keys(0), self.num_visible)  # (N, V)
        targets = masking.sample_targets(keys(3), visible, self.num_targets)  # (N, K)
        return visible, targets, scores

    def forward(self, imgs: Tensor, progress: float, noise: Tensor | None = None) -> PretrainOutput:
        """imgs (N, C, H, W) ImageNet-normalised; progress in [0, 1]; noise (N, R, L) uniform in (0, 1)."""
        N = imgs.shape[0]
        if noise is None:
            noise = self.make_noise(N, imgs.device)
        expected = (N, self.noise_channels, self.num_patches)
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {expected} (N, R, L)")
        patches = self.encoder.embed_patches(imgs)  # (N, L, D)
        visible, targets, scores = self.select(imgs, patches, progress, noise)
        latent = self.encoder.forward_tokens(patches, visible)  # (N, T, D)
        if isinstance(self.decoder, MAEDecoder):
            pred = self.decoder(latent, visible, targets)  # (N, K, P)
        else:
            pred = self.decoder(latent, targets)  # (N, K, P)
        loss = self.reconstruction_loss(imgs, pred, targets)
        return PretrainOutput(
            loss=loss, pred=pred, target_index=targets, visible_index=visible, scores=scores
        )

    def reconstruction_loss(self, imgs: Tensor, pred: Tensor, target_index: Tensor) -> Tensor:
        """Mean squared error over the K target patches, on per-patch normalised pixels if norm_pix_loss."""
        target = _gather_tokens(self.patchify(imgs), target_index).float()  # (N, K, P)
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return (pred.float() - target).square().mean()

    def encode(self, imgs: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, 1 + L, D): every token, no masking, as timm's forward_features."""
        return self.encoder(imgs)


def build_model(cfg: ModelConfig) -> PretrainModel:
    return PretrainModel(cfg)
