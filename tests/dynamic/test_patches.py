import pytest
import torch

from dyncnn.dynamic.patches import crop_patches, crop_patches_differentiable, patch_corners


def test_crop_matches_slicing_per_sample():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 20, 17)
    centers = torch.rand(5, 2)
    p = crop_patches(x, centers, 6)
    corners = patch_corners(centers, 20, 17, 6)
    for i in range(5):
        t, l = corners[i].tolist()
        assert torch.equal(p[i], x[i, :, t:t + 6, l:l + 6])


def test_corners_stay_inside():
    c = patch_corners(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-3.0, 7.0]]), 10, 12, 4)
    assert c.tolist() == [[0, 0], [6, 8], [0, 8]]


def test_differentiable_crop_equals_exact_crop_at_pixel_centres_and_has_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 12, 12)
    centers = torch.tensor([[0.0, 0.5], [0.25, 1.0]], requires_grad=True)   # integer corners for 12 - 4 = 8
    soft = crop_patches_differentiable(x, centers, 4)
    assert torch.allclose(soft, crop_patches(x, centers, 4), atol=1e-5)
    soft.sum().backward()
    assert centers.grad is not None and centers.grad.abs().sum() > 0


def test_bad_patch_and_centres():
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="patch size 9"):
        crop_patches(x, torch.zeros(2, 2), 9)
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        crop_patches(x, torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match="N, C, H, W"):
        crop_patches(x[0], torch.zeros(2, 2), 4)
