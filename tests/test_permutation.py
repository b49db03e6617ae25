"""The Mixer paper's permutation invariance, as examples/permutation_invariance.py shows it: a model
trained on images with shuffled patches and shuffled in-patch pixels trains exactly as the original
does on the originals, when it starts from the correspondingly permuted weights (mixer_fast blocks,
Mixer and ResMLP)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import permutation_invariance as example  # noqa: E402

from tolerances import max_err  # noqa: E402


def test_patch_round_trip_and_permutation():
    images = torch.randn(2, 3, 16, 24)
    assert torch.equal(example.images_of(example.patches_of(images, 8), 8, 3, 16, 24), images)
    token_perm, pixel_perm = torch.randperm(6), torch.randperm(192)
    permuted = example.permute_images(images, 8, token_perm, pixel_perm)
    assert torch.equal(example.patches_of(permuted, 8), example.patches_of(images, 8)[:, token_perm][:, :, pixel_perm])


@pytest.mark.parametrize("kind", ["mixer", "resmlp"])
def test_permuted_twin_trains_identically(kind):
    model, twin, token_perm, pixel_perm = example.train_pair(kind, steps=5)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    permuted = example.permute_images(images, 8, token_perm, pixel_perm)
    with torch.no_grad():
        logits, twin_logits = model(images), twin(permuted)
        expected = example.permute_model(model, token_perm, pixel_perm)
        # Only the summation order differs (permuted sums, in fp32): a few ulps of the values.
        assert max_err(twin_logits, logits) <= 1e-5 * float(logits.abs().max())
        for (name, a), b in zip(twin.named_parameters(), expected.parameters()):
            assert max_err(a, b) <= 1e-5 * max(1.0, float(b.abs().max())), name
        # Not vacuous: the same model without the permuted weights disagrees on the permuted images,
        # and training moved the weights.
        assert max_err(model(permuted), logits) > 1e-2 * float(logits.abs().max())
        fresh = example.small_model(kind)
        assert max(max_err(a, b) for a, b in zip(model.parameters(), fresh.parameters())) > 1e-3
