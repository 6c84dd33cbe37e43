"""RRDBNet's up-sampling steps without the up-sampled copy: nearest 2x then a 3x3 convolution, as one
convolution on the smaller image whose outputs are the four pixels each input pixel becomes.

Each output pixel (2i + a, 2j + b) of "nearest 2x, then 3x3" sees the small image through a 3x3
window around (i, j) in which some taps coincide: they are summed into one kernel per phase (a, b).
The four kernels run as one convolution with 4x the output channels (a GEMM four times wider,
which the GPU runs closer to its peak than 64 columns) and a pixel shuffle puts the phases in
place. Same arithmetic, no 4x-larger input tensor, and nothing to compile: cuDNN runs it eagerly.
The fused engine's tail runs the same phase weights in its own kernel, which stores each phase's
pixels in place itself (`fused_trunk.PackedConv.up`); `UpConv` is the cuDNN version.
"""

import torch
from torch import nn
from torch.nn import functional as F

# For phase 0 the taps above/at/below the up-sampled pixel fall on small-image rows -1, 0, 0; for phase 1 on 0, 0, +1.
_SOURCE_OFFSET = ((0, 1, 1), (1, 1, 2))  # [phase][tap] -> index into the small image's 3x3 window


def phase_weights(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(4 * C_out, C_in, 3, 3) weights and (4 * C_out) bias of `conv` applied after a nearest 2x
    up-sampling, as a convolution on the small image; output channel (2a + b) * C_out + c is
    channel c of the up-sampled pixel at phase (a, b)."""
    w = conv.weight.detach().float()
    c_out, c_in = w.shape[:2]
    phases = torch.zeros((2, 2, c_out, c_in, 3, 3), dtype=torch.float32, device=w.device)
    for a in range(2):
        for b in range(2):
            for dy in range(3):
                for dx in range(3):
                    phases[a, b, :, :, _SOURCE_OFFSET[a][dy], _SOURCE_OFFSET[b][dx]] += w[:, :, dy, dx]
    bias = conv.bias.detach().float().repeat(4)
    layout = torch.channels_last if conv.weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    weight = phases.reshape(4 * c_out, c_in, 3, 3).to(conv.weight.dtype).contiguous(memory_format=layout)
    return weight, bias.to(conv.weight.dtype)


class UpConv(nn.Module):
    """`lrelu(conv(nearest_2x(x)))` of RRDBNet's tail, computed on `x`'s own size."""

    def __init__(self, conv: nn.Conv2d, slope: float = 0.2):
        super().__init__()
        weight, bias = phase_weights(conv)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.c_out, self.slope = conv.out_channels, slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        phases = F.conv2d(x, self.weight, self.bias, padding=1)
        # the model's layout (its weights'): a 1x1 input is contiguous in both
        channels_last = not self.weight.is_contiguous()
        out = torch.empty((n, self.c_out, 2 * h, 2 * w), dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        # out[n, c, 2i + a, 2j + b] = phases[n, (2a + b) * C + c, i, j], in one copy whatever the layout
        source = phases.view(n, 2, 2, self.c_out, h, w)
        if channels_last:
            out.permute(0, 2, 3, 1).view(n, h, 2, w, 2, self.c_out).copy_(source.permute(0, 4, 1, 5, 2, 3))
        else:
            out.view(n, self.c_out, h, 2, w, 2).copy_(source.permute(0, 3, 4, 1, 5, 2))
        return F.leaky_relu_(out, self.slope)
