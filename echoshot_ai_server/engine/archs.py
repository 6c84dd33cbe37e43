"""The two network shapes the official Real-ESRGAN weights fit, as plain PyTorch modules.

They are the networks of ESRGAN / Real-ESRGAN as their papers describe them, with the parameter
names of the official checkpoints, so those load strictly. Defined here rather than imported from
basicsr / realesrgan because those packages import torchvision and much else on the way (seconds
of a worker's start-up, and more on a cold disk); tests check that both give the same outputs.
"""

import torch
from torch import nn
from torch.nn import functional as F


def _scaled_init(convs, scale: float) -> None:
    # ESRGAN's initialisation of the dense blocks: Kaiming normal, scaled down, zero bias
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight)
        conv.weight.data.mul_(scale)
        nn.init.zeros_(conv.bias)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convolutions, each reading the block's input and every feature map before it."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        widths = [num_feat + i * num_grow_ch for i in range(5)]
        for i, width in enumerate(widths, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(width, num_feat if i == 5 else num_grow_ch, 3, 1, 1))
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        _scaled_init([self.conv1, self.conv2, self.conv3, self.conv4, self.conv5], 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(self.lrelu(conv(torch.cat(features, 1))))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Three residual dense blocks inside one more residual connection."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator: a head convolution, `num_block` RRDBs with a long skip, two nearest-2x
    up-samplings each followed by a convolution, and two convolutions at the output's size. For
    `scale` 2 or 1 the input is first folded into channels (pixel unshuffle by 2 or 4)."""

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, scale: int = 4, num_feat: int = 64,
                 num_block: int = 23, num_grow_ch: int = 32):
        super().__init__()
        self.scale = scale
        self.fold = {4: 1, 2: 2, 1: 4}[scale]
        self.conv_first = nn.Conv2d(num_in_ch * self.fold ** 2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold > 1:
            x = F.pixel_unshuffle(x, self.fold)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact network: `num_conv` + 2 convolutions at the input's size with an
    activation after each but the last, whose `scale`² x 3 channels are shuffled into pixels and
    added to the nearest-neighbour up-sampled input."""

    ACTIVATIONS = {
        "relu": lambda feat: nn.ReLU(inplace=True),
        "prelu": lambda feat: nn.PReLU(num_parameters=feat),
        "leakyrelu": lambda feat: nn.LeakyReLU(negative_slope=0.1, inplace=True),
    }

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_conv: int = 16,
                 upscale: int = 4, act_type: str = "prelu"):
        super().__init__()
        self.upscale = upscale
        activation = self.ACTIVATIONS[act_type]
        layers: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), activation(num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), activation(num_feat)]
        layers.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
        self.body = nn.ModuleList(layers)  # the checkpoints' names: body.0, body.1, ...
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.upscale, mode="nearest")
