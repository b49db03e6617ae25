"""Permutation invariance (MLP-Mixer paper, "Invariance to input permutations"): a Mixer trained on images
whose patches, and the pixels inside every patch, are shuffled by one fixed permutation behaves exactly as
one trained on the original images, when the two start from correspondingly permuted weights.

Why: the stem is a linear map of each patch's pixels (a pixel permutation σ permutes its input columns),
token mixing is a linear map along tokens (a patch permutation π permutes the columns of the first
token-mixing layer, the rows of the second and its bias; ResMLP's S×S linear on both sides), channel
mixing acts on each token alone, and the head averages over tokens. So with W'_stem = W_stem[:, σ],
W'_1 = W_1[:, π], W'_2 = W_2[π, :], b'_2 = b_2[π], the permuted model on permuted images computes the
original model's logits, its gradients are the permuted gradients, and SGD keeps the two related at every
step: up to float rounding (sums taken in another order), they train identically.

    python examples/permutation_invariance.py        # trains both on synthetic data and prints the gap
"""
from __future__ import annotations

import copy
from typing import Tuple

import torch
from torch import Tensor, nn

import mixer_fast
from mixer_fast.reference.modules import MlpMixer, ResMLP


def patches_of(images: Tensor, patch: int) -> Tensor:
    """(N, ch, H, W) → (N, S, ch·patch²): row-major patches, each flattened as the stem's weight is (ch, p, q)."""
    N, ch, H, W = images.shape
    x = images.reshape(N, ch, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(N, (H // patch) * (W // patch), ch * patch * patch)


def images_of(patches: Tensor, patch: int, ch: int, H: int, W: int) -> Tensor:
    """The inverse of :func:`patches_of`."""
    N = patches.shape[0]
    x = patches.reshape(N, H // patch, W // patch, ch, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(N, ch, H, W)


def permute_images(images: Tensor, patch: int, token_perm: Tensor, pixel_perm: Tensor) -> Tensor:
    """Images whose patch j is the original patch token_perm[j] and whose value k inside a patch is the
    original value pixel_perm[k] (over ch·patch² values: colour channels are shuffled too)."""
    N, ch, H, W = images.shape
    p = patches_of(images, patch)[:, token_perm][:, :, pixel_perm]
    return images_of(p, patch, ch, H, W)


@torch.no_grad()
def permute_model(model: MlpMixer, token_perm: Tensor, pixel_perm: Tensor) -> MlpMixer:
    """A copy of ``model`` (Mixer or ResMLP, reference or mixer_fast blocks) that computes on
    permute_images(x) what ``model`` computes on x."""
    out = copy.deepcopy(model)
    w = out.stem.proj.weight  # (E, ch, p, p)
    w.copy_(w.reshape(w.shape[0], -1)[:, pixel_perm].reshape(w.shape))
    for block in out.blocks:
        if hasattr(block, "linear_tokens"):  # ResMLP: one S×S linear, permuted on both sides
            lin = block.linear_tokens
            lin.weight.copy_(lin.weight[token_perm][:, token_perm])
            lin.bias.copy_(lin.bias[token_perm])
        else:
            fc1, fc2 = block.mlp_tokens.fc1, block.mlp_tokens.fc2
            fc1.weight.copy_(fc1.weight[:, token_perm])
            fc2.weight.copy_(fc2.weight[token_perm])
            fc2.bias.copy_(fc2.bias[token_perm])
    return out


def small_model(kind: str = "mixer", seed: int = 0) -> MlpMixer:
    """A 32×32-image Mixer (or ResMLP) with patch 8 (S = 16 tokens), width 32, 2 blocks, 10 classes, built
    from mixer_fast blocks."""
    torch.manual_seed(seed)
    cls = MlpMixer if kind == "mixer" else ResMLP
    model = cls(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32)
    return mixer_fast.convert(model)


def train_pair(kind: str = "mixer", steps: int = 20, seed: int = 0) -> Tuple[MlpMixer, MlpMixer, Tensor, Tensor]:
    """Trains a model on synthetic originals and its permuted twin on the permuted images, with the same
    SGD steps; returns (model, twin, token_perm, pixel_perm)."""
    g = torch.Generator().manual_seed(seed)
    model = small_model(kind, seed)
    token_perm = torch.randperm(16, generator=g)
    pixel_perm = torch.randperm(3 * 8 * 8, generator=g)
    twin = permute_model(model, token_perm, pixel_perm)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, twin)]
    for _ in range(steps):
        images = torch.randn(8, 3, 32, 32, generator=g)
        labels = torch.randint(0, 10, (8,), generator=g)
        for m, opt, x in ((model, opts[0], images), (twin, opts[1], permute_images(images, 8, token_perm, pixel_perm))):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), labels).backward()
            opt.step()
    return model, twin, token_perm, pixel_perm


def main() -> None:
    for kind in ("mixer", "resmlp"):
        model, twin, token_perm, pixel_perm = train_pair(kind)
        images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model(images)
            twin_logits = twin(permute_images(images, 8, token_perm, pixel_perm))
            expected = permute_model(model, token_perm, pixel_perm)
        gap = (logits - twin_logits).abs().max().item()
        wgap = max((a - b).abs().max().item() for a, b in zip(twin.parameters(), expected.parameters()))
        print(f"{kind}: after 20 SGD steps, max |logits - twin logits on permuted images| = {gap:.2e} "
              f"(logits up to {logits.abs().max().item():.2f}); max |twin weights - permuted weights| = {wgap:.2e}")


if __name__ == "__main__":
    main()
