"""Analytic FLOPs of one training step per image, for MAE and SelectiveMAE.

Counts the matrix products only (linear layers, the patch-embedding convolution, attention scores and
the attention-weighted sum), as multiply-accumulates x 2. LayerNorm, GELU, softmax, the HOG score, token
selection and the loss are elementwise or tiny and left out. A training step is taken as 3x the forward
(backward = 2x forward), the usual convention for MFU.

Reference figures for ViT-B/16 at 224 px: MAE 58.6 (mask 0.75, 8-block decoder over 197 tokens,
predicting the 147 masked patches); SelectiveMAE 23.6 at decoder depth 8 and 27.3 at depth 12 (29
visible, 49 reconstructed, every decoder block projecting keys and values from the encoder width as the
reference code does: the figures measurements.md lists for it). With ``decoder_kv: shared`` (one
decoder_embed to the decoder width, every block from there) they are 23.3 and 26.8.
"""

from __future__ import annotations

from rspretrain import masking
from rspretrain.model import ModelConfig


def _block_macs(tokens: int, dim: int, mlp_ratio: float) -> float:
    """Self-attention transformer block: qkv + proj (4 D^2), MLP (2 r D^2) per token, and QK^T, AV."""
    return tokens * (4 + 2 * mlp_ratio) * dim**2 + 2 * tokens**2 * dim


def _cross_block_macs(
    queries: int, keys: int, dim: int, mlp_ratio: float, context_dim: int | None = None
) -> float:
    """Cross-attention block: q, proj and MLP on the queries, k and v on the keys (from context_dim), QK^T, AV."""
    kv_in = context_dim or dim
    return queries * (2 + 2 * mlp_ratio) * dim**2 + keys * 2 * kv_in * dim + 2 * queries * keys * dim


def forward_macs(cfg: ModelConfig) -> dict[str, float]:
    """Multiply-accumulates of one forward pass for one image, by part."""
    cfg.validate()
    dims = cfg.encoder_dims()
    p, D, r = dims["patch_size"], dims["embed_dim"], dims["mlp_ratio"]
    E = cfg.effective_decoder_embed_dim
    L = (cfg.img_size // p) ** 2
    P = p * p * cfg.in_chans
    V = masking.num_visible_patches(L, cfg.effective_mask_ratio)
    T = 1 + V  # encoder tokens: class token + visible patches
    depth = cfg.effective_decoder_depth
    macs = {
        # Both methods embed every patch: SelectiveMAE needs all embeddings for the similarity ranking.
        "patch_embed": L * P * D,
        "encoder": dims["depth"] * _block_macs(T, D, r),
    }
    if cfg.method == "mae":
        K = L - V
        macs["decoder_embed"] = T * D * E
        macs["decoder"] = depth * _block_macs(1 + L, E, r)
    else:
        K = masking.num_target_patches(L, cfg.kept_mask_ratio, V)
        if cfg.decoder_kv == "shared":
            macs["decoder_embed"] = T * D * E
            macs["decoder"] = depth * _cross_block_macs(K, T, E, r)
        else:  # keys and values projected from the encoder width in every block
            macs["decoder"] = depth * _cross_block_macs(K, T, E, r, context_dim=D)
    macs["decoder_pred"] = K * E * P
    return macs


def training_gflops_per_image(cfg: ModelConfig) -> float:
    """Analytic forward + backward (3x forward) GFLOPs per image."""
    return 3 * 2 * sum(forward_macs(cfg).values()) / 1e9
