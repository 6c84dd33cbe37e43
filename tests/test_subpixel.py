"""The sub-pixel up-sampling of the fused engine's tail: one convolution on the small image computes
"nearest 2x, then 3x3, then LeakyReLU" of RRDBNet exactly (up to float rounding)."""

import pytest
import torch
from torch.nn import functional as F

from echoshot_ai_server.engine.subpixel import UpConv, phase_weights


def reference(conv, x):
    return F.leaky_relu(conv(F.interpolate(x, scale_factor=2, mode="nearest")), 0.2)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("size", [(5, 7), (1, 1), (8, 3)])
def test_one_convolution_on_the_small_image_is_nearest_2x_then_3x3(layout, size):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 8, 3, padding=1).to(memory_format=layout)
    x = torch.randn(2, 16, *size).contiguous(memory_format=layout)

    got = UpConv(conv)(x)

    expected = reference(conv, x)
    assert got.shape == expected.shape == (2, 8, 2 * size[0], 2 * size[1])
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert got.is_contiguous(memory_format=layout)  # what the next convolution reads without a copy


def test_each_phase_keeps_the_kernels_taps():
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    weight, bias = phase_weights(conv)
    per_phase = weight.view(4, 3, 4, 3, 3)
    # every phase sums all nine taps of the original (some of them into one) and keeps its bias
    assert torch.allclose(per_phase.sum(dim=(3, 4)), conv.weight.sum(dim=(2, 3)).expand(4, 3, 4), atol=1e-6)
    assert torch.equal(bias.view(4, 3), conv.bias.detach().expand(4, 3))
    # phase (0, 0) never reaches the row or column after the pixel; phase (1, 1) never the one before
    assert per_phase[0, :, :, 2, :].abs().sum() == 0 and per_phase[0, :, :, :, 2].abs().sum() == 0
    assert per_phase[3, :, :, 0, :].abs().sum() == 0 and per_phase[3, :, :, :, 0].abs().sum() == 0


def test_half_precision_stays_within_its_rounding():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.rand(1, 16, 6, 6)
    expected = reference(conv, x)
    got = UpConv(conv.to(torch.bfloat16))(x.to(torch.bfloat16)).float()
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2
