"""RRDBNet's trunk without concatenations: Triton 3x3 convolutions on channels-last buffers.

Each residual dense block (RDB) owns one NHWC buffer of 64 + 4 x 32 channels. Its input sits in
channels 0-63; conv1..conv4 read the first 64, 96, 128, 160 channels in place and write their
LeakyReLU'd output straight into the next 32 channels; conv5 reads all 192 and writes
`conv * 0.2 + input` (for the third RDB also the RRDB's own residual) into the next block's buffer.
No `torch.cat`, no separate element-wise kernels: bias, activation and residuals are fused into
the convolution's epilogue. The result equals basicsr's RRDBNet up to fp16 rounding.
"""

import torch
import triton
import triton.language as tl
from torch import nn
from torch.nn import functional as F

FEAT, GROW = 64, 32
BUFFER_CHANNELS = FEAT + 4 * GROW


@triton.jit
def _conv3x3_nhwc(
    x_ptr, x_stride,  # input pixels (channel 0 of the buffer) and the buffer's pixel stride
    w_ptr,  # weights as [9 * CIN, COUT], tap-major
    b_ptr,  # bias [COUT], fp32
    out_ptr, out_stride,
    r1_ptr, r1_stride, r2_ptr, r2_stride,
    total, H, W,
    slope, scale, scale2,
    CIN: tl.constexpr, COUT: tl.constexpr,
    LRELU: tl.constexpr, RES1: tl.constexpr, RES2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, TILE_W: tl.constexpr,
):
    pid = tl.program_id(0)
    if TILE_W > 0:  # a 2-D patch of BLOCK_M // TILE_W rows x TILE_W columns: the 9 taps overlap in L1
        tiles_w = tl.cdiv(W, TILE_W)
        tiles_h = tl.cdiv(H, BLOCK_M // TILE_W)
        n = pid // (tiles_h * tiles_w)
        rest = pid % (tiles_h * tiles_w)
        i = tl.arange(0, BLOCK_M)
        h = (rest // tiles_w) * (BLOCK_M // TILE_W) + i // TILE_W
        w = (rest % tiles_w) * TILE_W + i % TILE_W
        in_range = (h < H) & (w < W)
        offs_m = ((n * H + h) * W + w).to(tl.int64)
    else:  # a run of BLOCK_M consecutive pixels
        offs_m = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        in_range = offs_m < total
        hw = offs_m % (H * W)
        h = hw // W
        w = hw % W
    offs_n = tl.arange(0, COUT)
    acc = tl.zeros((BLOCK_M, COUT), dtype=tl.float32)
    for tap in tl.static_range(9):
        dy = tap // 3 - 1
        dx = tap % 3 - 1
        valid = in_range & (h + dy >= 0) & (h + dy < H) & (w + dx >= 0) & (w + dx < W)
        pixel = offs_m + dy * W + dx
        for k0 in tl.static_range(0, CIN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < CIN
            a = tl.load(x_ptr + pixel[:, None] * x_stride + offs_k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + (tap * CIN + offs_k)[:, None] * COUT + offs_n[None, :], mask=k_ok[:, None], other=0.0)
            acc = tl.dot(a, b, acc)
    acc += tl.load(b_ptr + offs_n)[None, :]
    if LRELU:
        acc = tl.where(acc >= 0, acc, acc * slope)
    if RES1:
        r1 = tl.load(r1_ptr + offs_m[:, None] * r1_stride + offs_n[None, :], mask=in_range[:, None], other=0.0)
        acc = acc * scale + r1.to(tl.float32)
    if RES2:
        r2 = tl.load(r2_ptr + offs_m[:, None] * r2_stride + offs_n[None, :], mask=in_range[:, None], other=0.0)
        acc = acc * scale2 + r2.to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * out_stride + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=in_range[:, None])


# On the GPU the tile shape is autotuned once per layer shape; elsewhere (Triton's interpreter, in
# the tests) a fixed one is used.
_conv3x3_nhwc_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "TILE_W": tw}, num_warps=w, num_stages=s)
        for bm, bk, tw, w, s in [
            (128, 32, 0, 4, 3), (128, 32, 16, 4, 3), (128, 64, 16, 4, 3), (256, 32, 32, 8, 3),
            (256, 64, 32, 8, 3), (128, 64, 32, 4, 4), (64, 64, 16, 4, 3), (256, 32, 16, 8, 4),
        ]
    ],
    key=["CIN", "COUT", "H", "W"],
)(_conv3x3_nhwc)


def _grid(n: int, h: int, w: int):
    def grid(meta):
        if meta["TILE_W"] > 0:
            rows = meta["BLOCK_M"] // meta["TILE_W"]
            return (n * triton.cdiv(h, rows) * triton.cdiv(w, meta["TILE_W"]),)
        return (triton.cdiv(n * h * w, meta["BLOCK_M"]),)

    return grid


class _Conv:
    """A 3x3 convolution's weights, packed for the kernel."""

    tile_w = 8  # the fixed tile shape of the interpreter path (tests): 8 x 8 pixels

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype):
        cout, cin = conv.weight.shape[:2]
        self.cin, self.cout = cin, cout
        self.weight = conv.weight.detach().permute(2, 3, 1, 0).reshape(9 * cin, cout).to(dtype).contiguous()
        self.bias = conv.bias.detach().float().contiguous()

    def __call__(self, src: torch.Tensor, out: torch.Tensor, *, lrelu=False, res1=None, scale=1.0, res2=None, scale2=1.0):
        """src/out/res: NHWC views whose last dimension is contiguous (channel slices of buffers)."""
        n, h, w, _ = src.shape
        total = n * h * w
        r1 = res1 if res1 is not None else out
        r2 = res2 if res2 is not None else out
        args = (src, src.stride(2), self.weight, self.bias, out, out.stride(2),
                r1, r1.stride(2), r2, r2.stride(2), total, h, w, 0.2, scale, scale2)
        flags = dict(CIN=self.cin, COUT=self.cout, LRELU=lrelu, RES1=res1 is not None, RES2=res2 is not None)
        if src.is_cuda:
            _conv3x3_nhwc_tuned[_grid(n, h, w)](*args, **flags)
        else:
            _conv3x3_nhwc[_grid(n, h, w)({"BLOCK_M": 64, "TILE_W": self.tile_w})](
                *args, **flags, BLOCK_M=64, BLOCK_K=32, TILE_W=self.tile_w)


class FusedRRDBNet(nn.Module):
    """basicsr's RRDBNet (scale 4) with its trunk run by the fused kernels. Input/output as RRDBNet's."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float16):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.blocks = [
            [(_Conv(rdb.conv1, dtype), _Conv(rdb.conv2, dtype), _Conv(rdb.conv3, dtype), _Conv(rdb.conv4, dtype),
              _Conv(rdb.conv5, dtype)) for rdb in (block.rdb1, block.rdb2, block.rdb3)]
            for block in model.body
        ]
        self.conv_body = _Conv(model.conv_body, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        feat = m.conv_first(x)  # (N, 64, H, W)
        n, _, h, w = feat.shape
        buffers = [torch.empty((n, h, w, BUFFER_CHANNELS), dtype=self.dtype, device=x.device) for _ in range(4)]
        buffers[0][..., :FEAT] = feat.permute(0, 2, 3, 1)
        current = 0
        for rdbs in self.blocks:
            rrdb_in = buffers[current]
            order = [current, (current + 1) % 4, (current + 2) % 4, (current + 3) % 4]
            for i, convs in enumerate(rdbs):
                buf = buffers[order[i]]
                for k, conv in enumerate(convs[:4]):
                    conv(buf[..., : FEAT + k * GROW], buf[..., FEAT + k * GROW: FEAT + (k + 1) * GROW], lrelu=True)
                nxt = buffers[order[i + 1]]
                if i < 2:
                    convs[4](buf, nxt[..., :FEAT], res1=buf[..., :FEAT], scale=0.2)
                else:  # the RRDB's residual too: ((conv * 0.2 + rdb3 input) * 0.2 + rrdb input)
                    convs[4](buf, nxt[..., :FEAT], res1=buf[..., :FEAT], scale=0.2, res2=rrdb_in[..., :FEAT], scale2=0.2)
            current = order[3]
        trunk = buffers[current]
        out = torch.empty((n, h, w, FEAT), dtype=self.dtype, device=x.device)
        feat_nhwc = feat.permute(0, 2, 3, 1)
        if not feat_nhwc.is_contiguous():
            feat_nhwc = feat_nhwc.contiguous()
        self.conv_body(trunk[..., :FEAT], out, res1=feat_nhwc, scale=1.0)
        feat = out.permute(0, 3, 1, 2)  # channels-last NCHW view
        feat = m.lrelu(m.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = m.lrelu(m.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return m.conv_last(m.lrelu(m.conv_hr(feat)))
