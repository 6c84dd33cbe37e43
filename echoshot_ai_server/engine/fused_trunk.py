"""The fused engine: RRDBNet's trunk as Triton 3x3 convolutions over zero-padded flat buffers.

Each residual dense block (RDB) owns one buffer of F + 4 x G channels (F = 64 features, G = 32
growth channels for RealESRGAN_x4plus) whose rows are the pixels of the batch's frames, each
frame with a one-pixel ring of zeros around it, one frame after the other:
row = (n * (H + 2) + y + 1) * (W + 2) + x + 1. In that layout a 3x3 convolution is a GEMM whose A
operand, for each of the nine taps, is the same run of rows shifted by a constant
(dy * (W + 2) + dx): the kernel loads it with the tensor-memory accelerator (TMA), which also
fills rows beyond the ends of the buffer with zeros. conv1..conv4 run as four "dense steps"
(see `dense_steps`): step j reads the newest G (first: F) channels in place, writes the finished
conv_(j+1), LeakyReLU'd, straight into the next G channels and partial sums of the later
convolutions into the channels after them, where their own steps find them (and overwrite them with
the finished features). conv5 reads all F + 4G channels and writes `conv * 0.2 + input`
(for the third RDB also the RRDB's own residual) into the next block's buffer. Every store writes
zeros on the ring rows, so the padding stays zero. There is no `torch.cat` and no separate
element-wise kernel in the trunk. The head (3 -> 64 channels) runs through cuDNN. The up-sampling
tail runs in the same kernel: each "nearest 2x + 3x3" as four phase convolutions on the smaller
buffer (`subpixel.phase_weights`), each over the four taps of its window that are not zero, whose
results the kernel stores straight into their places in the padded buffer at twice the size
(`SHUFFLE`), LeakyReLU included. conv_hr follows on that buffer and stores, instead of its 64
channels, each tap's share of conv_last's 3 outputs (`PROJECT`), which a small kernel adds up
(`TapShares`). No compiler is needed anywhere; RRDBNet's own tail under
torch.compile remains as an option (`compile_tail_in_background`, `compile_head_tail`), slower since.
The result equals RRDBNet's up to fp16 rounding. Nothing is compiled or tuned per frame
size: the kernel takes the size at run time and its tile shape is tuned per size class.

TMA needs compute capability 9.0 (Hopper) or later. Off the GPU, the same kernel runs in Triton's
interpreter (TRITON_INTERPRET=1), which is how the tests check it.
"""

import contextlib
import hashlib
import inspect
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import nn
from torch.nn import functional as F
from triton.tools.tensor_descriptor import TensorDescriptor

from echoshot_ai_server.engine import warp_specialised_conv
from echoshot_ai_server.engine.subpixel import UpConv, phase_weights

log = logging.getLogger(__name__)


# The frame's size is never compiled in: one kernel serves every video (see `size_class`).
@triton.jit(do_not_specialize=["rows", "frame_rows", "row_pitch", "H", "W", "size_class"])
def conv3x3_kernel(
    x_desc,  # [rows, CIN] input channels (a prefix of a buffer's channels)
    w_desc, w2_desc,  # [9 * CIN, COUT + COUT2] weights, tap-major: blocks of columns [0, COUT) and [COUT, COUT2)
    b_ptr,  # [COUT + COUT2] bias, fp32
    out_desc, out2_desc,  # [rows, <= COUT + COUT2] output (a channel slice of a buffer): columns [0, COUT), the rest
    r1_desc, r2_desc,  # [rows, COUT] residuals (channel slices of buffers)
    out_ptr,  # SHUFFLE: the padded flat buffer of the frames at twice the size, [rows at 2x, COUT];
    # PROJECT: the next convolution's per-tap shares, [9, rows, PLANE] (see `TapShares`)
    proj_ptr,  # PROJECT: [COUT, PROJECT] the next convolution's weights, column t * TAP_OUTS + c for tap t
    rows, frame_rows, row_pitch, H, W,  # buffer rows, (H + 2) * (W + 2), W + 2, the frame's size
    size_class,  # read by the autotuner only
    slope, scale, scale2,
    CIN: tl.constexpr, COUT: tl.constexpr,
    COUT2: tl.constexpr,  # > 0: a second block of output columns (COUT + COUT2 is no power of two: 96 = 64 + 32)
    BIAS: tl.constexpr,  # False: the bias is in the partial sums already
    LRELU: tl.constexpr, RES1: tl.constexpr, RES2: tl.constexpr,
    GROW: tl.constexpr,  # a dense step: columns [0, GROW) are its own convolution, the others partial sums
    SUMS_IN: tl.constexpr,  # a dense step after the first: add the partial sums that `out` holds, in place
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PERSISTENT: tl.constexpr,
    PER_SM: tl.constexpr = 0,  # read by the launch grid only
    SHUFFLE: tl.constexpr = False,  # nearest 2x + this convolution: phase (a, b) = program_id(1) = 2a + b
    PROJECT: tl.constexpr = 0,  # > 0: the output times `proj` is stored instead of the output
    TAP_OUTS: tl.constexpr = 0, PLANE: tl.constexpr = 0,  # PROJECT: the next convolution's outputs, their plane's width
):
    k_steps: tl.constexpr = (CIN + BLOCK_K - 1) // BLOCK_K
    # SHUFFLE: phase (a, b) sees only rows a - 1, a and columns b - 1, b of the small image around each
    # pixel (`subpixel.phase_weights`): the weights hold one [4 * CIN, COUT] block per phase for those
    # four taps, and this program computes one phase
    taps: tl.constexpr = 4 if SHUFFLE else 9
    phase = tl.program_id(1) if SHUFFLE else 0
    # Persistent programs walk over several tiles; the loop nest is then flattened so that the
    # next tile's loads are already in flight during this tile's epilogue.
    for tile in tl.range(tl.program_id(0), tl.cdiv(rows, BLOCK_M), tl.num_programs(0), flatten=PERSISTENT):
        row0 = tile * BLOCK_M
        acc = tl.zeros((BLOCK_M, COUT), dtype=tl.float32)
        if COUT2 > 0:
            acc2 = tl.zeros((BLOCK_M, COUT2), dtype=tl.float32)
        # One loop over (tap, channel step) so that Triton pipelines the TMA loads across taps. Channels
        # past CIN read as zeros (outside the descriptor), so the weight rows they meet do not count.
        for step in range(taps * k_steps):
            tap = step // k_steps
            k0 = (step % k_steps) * BLOCK_K
            if SHUFFLE:
                shift = (phase // 2 - 1 + tap // 2) * row_pitch + (phase % 2 - 1 + tap % 2)
            else:
                shift = (tap // 3 - 1) * row_pitch + (tap % 3 - 1)
            a = x_desc.load([row0 + shift, k0])
            b = w_desc.load([(phase * taps + tap) * CIN + k0, 0])
            acc = tl.dot(a, b, acc)
            if COUT2 > 0:
                acc2 = tl.dot(a, w2_desc.load([(phase * taps + tap) * CIN + k0, COUT]), acc2)
        if BIAS:
            acc += tl.load(b_ptr + phase * COUT + tl.arange(0, COUT))[None, :]
            if COUT2 > 0:
                acc2 += tl.load(b_ptr + COUT + tl.arange(0, COUT2))[None, :]
        row = row0 + tl.arange(0, BLOCK_M)
        in_frame = row % frame_rows
        y = in_frame // row_pitch
        x = in_frame % row_pitch
        inside = ((y >= 1) & (y <= H) & (x >= 1) & (x <= W))[:, None]
        if SHUFFLE:
            # pixel (y, x) of the padded frame becomes (2y - 1 + a, 2x - 1 + b) of the padded frame at 2x,
            # whose ring rows are left as they are (zeros, see `zero_ring`)
            if LRELU:  # max(x, slope * x) with 0 < slope < 1
                acc = tl.maximum(acc, acc * slope)
            frame = (row // frame_rows).to(tl.int64)
            target = (frame * (2 * H + 2) + 2 * y - 1 + phase // 2) * (2 * W + 2) + 2 * x - 1 + phase % 2
            columns = tl.arange(0, COUT)[None, :]
            tl.store(out_ptr + target[:, None] * COUT + columns, acc.to(out_ptr.dtype.element_ty),
                     mask=inside & (row < rows)[:, None])
        else:
            if SUMS_IN:
                acc += out_desc.load([row0, 0]).to(tl.float32)
                if COUT2 > 0:
                    acc2 += out2_desc.load([row0, COUT]).to(tl.float32)
            if LRELU:  # max(x, slope * x) with 0 < slope < 1
                if GROW > 0:  # partial sums (columns from GROW on) are stored before the activation: slope 1
                    acc = tl.maximum(acc, acc * tl.where(tl.arange(0, COUT) < GROW, slope, 1.0)[None, :])
                else:
                    acc = tl.maximum(acc, acc * slope)
            if RES1:
                acc = acc * scale + r1_desc.load([row0, 0]).to(tl.float32)
            if RES2:
                acc = acc * scale2 + r2_desc.load([row0, 0]).to(tl.float32)
            acc = tl.where(inside, acc, 0.0)
            if PROJECT > 0:
                # Each tap's share of the next 3x3 convolution (conv_last: 3 outputs from 64 channels) is a
                # product with this tile alone; stored in one plane per tap, ring rows included (zeros),
                # they leave that convolution a sum of nine shifted loads (`taps_sum_kernel`), and this layer's
                # output is never stored.
                k = tl.arange(0, COUT)
                j = tl.arange(0, PROJECT)
                proj = tl.load(proj_ptr + k[:, None] * PROJECT + j[None, :])
                shares = tl.dot(acc.to(proj.dtype), proj)
                target = ((j // TAP_OUTS).to(tl.int64) * rows * PLANE)[None, :] + \
                    (row.to(tl.int64) * PLANE)[:, None] + (j % TAP_OUTS)[None, :]
                tl.store(out_ptr + target, shares.to(out_ptr.dtype.element_ty),
                         mask=(j < 9 * TAP_OUTS)[None, :] & (row < rows)[:, None])
            else:
                out_desc.store([row0, 0], acc.to(out_desc.dtype))
                if COUT2 > 0:  # partial sums only (GROW <= COUT)
                    out2_desc.store([row0, COUT], tl.where(inside, acc2, 0.0).to(out2_desc.dtype))


@triton.jit(do_not_specialize=["pixels", "rows", "H", "W"])
def taps_sum_kernel(shares_ptr, bias_ptr, out_ptr, pixels, rows, H, W,
                    TAP_OUTS: tl.constexpr, PLANE: tl.constexpr, BLOCK: tl.constexpr):
    """A 3x3 convolution from its per-tap shares (`PROJECT`): out[pixel] = bias + sum over the taps t of
    shares[t, row of the pixel + shift of t]. Pixels in (frame, y, x) order; out is [pixels, PLANE]."""
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = (pixel < pixels)[:, None]
    y = (pixel // W) % H
    row = ((pixel // (H * W)) * (H + 2) + y + 1).to(tl.int64) * (W + 2) + pixel % W + 1
    c = tl.arange(0, PLANE)[None, :]
    used = live & (c < TAP_OUTS)
    plane = rows.to(tl.int64) * PLANE
    acc = tl.zeros((BLOCK, PLANE), tl.float32) + tl.load(bias_ptr + c, mask=c < TAP_OUTS, other=0.0)
    for t in tl.static_range(9):
        at = row + (t // 3 - 1) * (W + 2) + (t % 3 - 1)
        acc += tl.load(shares_ptr + t * plane + at[:, None] * PLANE + c, mask=used, other=0.0).to(tl.float32)
    tl.store(out_ptr + pixel.to(tl.int64)[:, None] * PLANE + c, acc.to(out_ptr.dtype.element_ty), mask=live)


DESCRIPTORS = ("x_desc", "w_desc", "w2_desc", "out_desc", "out2_desc", "r1_desc", "r2_desc")


def _set_block_shapes(nargs) -> None:
    """Descriptors carry their block shape: set it to the configuration being run (those of the second
    block of columns only where there is one: otherwise they are the first block's, unused)."""
    block_m, block_k, cout, cout2 = nargs["BLOCK_M"], nargs["BLOCK_K"], nargs["COUT"], nargs["COUT2"]
    nargs["x_desc"].block_shape = [block_m, block_k]
    nargs["w_desc"].block_shape = [block_k, cout]
    for name in ("out_desc", "r1_desc", "r2_desc"):
        nargs[name].block_shape = [block_m, cout]
    if cout2:
        nargs["w2_desc"].block_shape = [block_k, cout2]
        nargs["out2_desc"].block_shape = [block_m, cout2]


# On the GPU a layer shape whose tile shape is not known yet (`TUNED`) is autotuned once over these;
# in the interpreter (tests) a fixed one is used.
TUNING_CONFIGS = [  # (BLOCK_M, BLOCK_K, warps, stages, programs per SM; 0 = one program per tile)
    (256, 32, 4, 4, 0), (256, 32, 8, 4, 0), (256, 64, 8, 3, 0), (256, 64, 4, 3, 0),
    (256, 32, 4, 6, 0), (256, 32, 4, 8, 0), (256, 64, 4, 5, 0), (256, 32, 8, 6, 0),
    (256, 32, 4, 4, 1), (256, 64, 8, 3, 1), (256, 32, 4, 6, 1), (256, 64, 4, 4, 1),
    (128, 32, 4, 4, 0), (128, 64, 4, 4, 0), (128, 32, 8, 4, 0), (128, 32, 4, 4, 2), (256, 32, 4, 3, 2),
    (128, 32, 4, 3, 0),
]
_CACHE_RESULTS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
conv3x3_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "PERSISTENT": per_sm > 0, "PER_SM": per_sm}, num_warps=w,
                           num_stages=s, pre_hook=_set_block_shapes)
             for bm, bk, w, s, per_sm in TUNING_CONFIGS],
    key=["CIN", "COUT", "size_class", "SHUFFLE", "PROJECT"],
    **_CACHE_RESULTS,
)(conv3x3_kernel)


# On Hopper, the dense blocks' layers run as warp-specialised Gluon kernels (warp_specialised_conv);
# False: every layer in `conv3x3_kernel` (to compare them: bench/trunk_variants.py).
WARP_SPECIALISED = True
_ws_failed: set = set()  # specialisations of the Gluon kernel that did not compile: the Triton kernel serves them


# While set (`launches_recorded`), launches with known tile shapes are recorded instead of run, so
# that their kernels can be compiled side by side (`compile_launches`) before anything runs.
_recorded: list | None = None


@contextlib.contextmanager
def launches_recorded():
    """Record, instead of running, every fused-kernel launch whose tile shape is known; yields the list."""
    global _recorded
    _recorded = []
    try:
        yield _recorded
    finally:
        _recorded = None


def recording() -> bool:
    return _recorded is not None


def distinct_launches(launches: list) -> list:
    """One recorded launch (kernel, grid, args, kwargs) per kernel specialisation: its kernel,
    constants, configuration and descriptors."""
    distinct = {}
    for kernel, grid, args, kwargs in launches:
        descriptors = tuple((tuple(d.block_shape), tuple(d.strides)) for d in args if isinstance(d, TensorDescriptor))
        distinct.setdefault((kernel.__name__, tuple(sorted(kwargs.items())), descriptors), (kernel, grid, args, kwargs))
    return list(distinct.values())


def compile_launches(launches: list, workers: int) -> int:
    """Compile the kernels of recorded launches on `workers` threads, each distinct specialisation
    once (ptxas runs as a process of its own; parts of Triton's compiler hold the interpreter lock,
    so threads halve the time rather than divide it). Returns how many."""
    distinct = distinct_launches(launches)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="compile") as pool:
        list(pool.map(lambda launch: launch[0].warmup(*launch[2], grid=launch[1], **launch[3]), distinct))
    return len(distinct)


# Tile shapes known for a convolution (CIN, COUT, size class, kind: 0 plain, 1 up-sampling phases,
# 2 storing the next convolution's shares): launched with them directly, without the autotuner on the
# way. Keyed by the layer's shape alone, so that a file of them stays valid whatever else a Triton
# version puts into its autotuner's keys (argument dtypes, for one).
TUNED: dict[tuple[int, int, int, int], triton.Config] = {}


def save_tuned(path: Path) -> int:
    """Write the tile shapes known so far (loaded, or tuned in this process) to `path` (JSON);
    returns how many. Triton keeps no tuning results on disk for kernels whose configurations carry
    a pre-hook, as these do."""
    known = dict(TUNED)
    for key, cfg in conv3x3_tuned.cache.items():
        known.setdefault((*key[:3], kind_of(shuffle=key[3], project=key[4])), cfg)
    entries = [{"key": list(key), "kwargs": cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                "maxnreg": cfg.maxnreg} for key, cfg in known.items()]
    # Workers of one host (one per GPU) share the file: it is replaced whole, never seen half written.
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps({"kernel": kernel_version(), "tiles": entries}))
    os.replace(partial, path)
    return len(entries)


def kind_of(shuffle, project) -> int:
    """A convolution's kind in the tuning keys: 0 plain, 1 up-sampling phases, 2 storing shares."""
    return 1 if shuffle else 2 if project else 0


def measured_defaults() -> Path:
    """Tile shapes tuned on this GPU architecture (tuned/sm90.json: on an H100 and an H200, 2026-11-28),
    shipped so that a worker on a machine with empty caches starts without tuning: it only compiles."""
    major, minor = torch.cuda.get_device_capability()
    return Path(__file__).parent / "tuned" / f"sm{major}{minor}.json"


def kernel_version() -> str:
    """Which kernel tile shapes were tuned for: a hash of its source."""
    return hashlib.sha256(inspect.getsource(conv3x3_kernel.fn).encode()).hexdigest()[:16]


def load_tuned(path: Path, any_kernel: bool = False) -> int:
    """Take the tile shapes tuned by an earlier process on the same GPU and versions (`save_tuned`),
    so that they are not tuned again; they replace those known for the same layers. Returns how many
    the file holds, 0 if it was tuned for another version of the kernel (a kernel cache kept over an
    upgrade of this package): those would replace the shapes shipped for this one. `any_kernel`: take
    them whatever the version (the shipped file). Keys written before the kinds of convolution had
    keys of their own end after the size class (or go on with argument dtypes): those are the plain
    convolutions'."""
    if not path.is_file():
        return 0
    data = json.loads(path.read_text())
    entries, version = (data, None) if isinstance(data, list) else (data["tiles"], data.get("kernel"))
    if not any_kernel and version != kernel_version():
        log.info("tile shapes in %s were tuned for another version of the fused kernel: not used", path)
        return 0
    for entry in entries:
        key = entry["key"]
        kind = int(key[3]) if len(key) > 3 and isinstance(key[3], int) else 0
        TUNED[(*key[:3], kind)] = triton.Config(entry["kwargs"], num_warps=entry["num_warps"],
                                              num_stages=entry["num_stages"], maxnreg=entry.get("maxnreg"))
    return len(entries)


# Tile shapes are tuned once per convolution and size class, not per frame size: a video of a
# size never seen before runs at once on the configuration tuned for its class. Two classes, by the
# rows of a pass (4 frames up to about 720x720, and more), since the best tile differs a little
# between a few hundred tiles and tens of thousands.
SIZE_CLASS_ROWS = (1 << 21,)


def size_class(rows: int) -> int:
    return sum(rows >= bound for bound in SIZE_CLASS_ROWS)


def launch_grid(rows: int, meta: dict) -> tuple[int]:
    tiles = triton.cdiv(rows, meta["BLOCK_M"])
    if meta.get("PER_SM", 0) == 0:
        return (tiles,)
    return (min(tiles, meta["PER_SM"] * torch.cuda.get_device_properties(0).multi_processor_count),)


def _descriptor(t: torch.Tensor) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(t, [1, 1])  # the block shape is set per configuration


class PackedConv:
    """A 3x3 convolution's weights as the kernel reads them: [9 * CIN, COUT], tap-major; with
    `phases` = 4 (nearest 2x + this convolution, see `subpixel.phase_weights`), a [4 * CIN, COUT]
    block per phase (a, b): the taps of rows a, a + 1 and columns b, b + 1 of its 3x3 window, the others
    being zeros."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, phases: int = 1,
                 tuned_class: int | None = None):
        """`bias` None: none added (a dense step's partial sums carry it); `tuned_class`: run with this
        size class's tile shape whatever the rows (None: by the rows)."""
        cout, cin = weight.shape[0] // phases, weight.shape[1]
        self.cin, self.cout, self.phases, self.tuned_class = cin, cout, phases, tuned_class
        # the kernel's blocks of output columns are powers of two: 96 columns are 64 + 32
        self.cout1 = 1 << (cout.bit_length() - 1)
        self.cout2 = cout - self.cout1
        if self.cout2 & (self.cout2 - 1):
            raise ValueError(f"{cout} output channels: neither a power of two nor the sum of two")
        by_phase = weight.detach().reshape(phases, cout, cin, 3, 3).permute(0, 3, 4, 2, 1)  # [phase, y, x, in, out]
        if phases > 1:
            by_phase = torch.stack([by_phase[p, p // 2:p // 2 + 2, p % 2:p % 2 + 2] for p in range(phases)])
        self.weight = by_phase.reshape(-1, cout).to(dtype).contiguous()
        self.has_bias = bias is not None
        self.bias = (bias.detach() if self.has_bias else weight.new_zeros(cout * phases)).float().contiguous()

    @classmethod
    def of(cls, conv: nn.Conv2d, dtype: torch.dtype, tuned_class: int | None = None) -> "PackedConv":
        return cls(conv.weight, conv.bias, dtype, tuned_class=tuned_class)

    @classmethod
    def up(cls, conv: nn.Conv2d, dtype: torch.dtype, tuned_class: int | None = None) -> "PackedConv":
        """Nearest 2x followed by `conv`, as four phases on the smaller image."""
        return cls(*phase_weights(conv), dtype, phases=4, tuned_class=tuned_class)

    def tuning_key(self, rows: int, project: bool = False) -> tuple[int, int, int, int]:
        """Its key in `TUNED` on a buffer of `rows` rows (`project`: storing the next one's shares)."""
        klass = size_class(rows) if self.tuned_class is None else self.tuned_class
        return self.cin, self.cout, klass, kind_of(shuffle=self.phases > 1, project=project)

    def __call__(self, src: torch.Tensor, out: torch.Tensor, frame: tuple[int, int], *, lrelu=False,
                 res1=None, scale=1.0, res2=None, scale2=1.0, grow=0, sums_in=False,
                 project: "TapShares | None" = None):
        """src/out/res: [rows, C] channel slices of padded flat buffers; frame: (H, W). With phases,
        `out` is the padded flat buffer of the frames at twice the size (its ring rows zero).
        A dense step (`grow` > 0, see `dense_step_views`) activates only its first `grow` columns; with
        `sums_in` it adds the partial sums that `out` holds before it overwrites them. With `project`,
        `out` takes the per-tap shares of that next convolution (`TapShares.buffer`) instead."""
        shuffle = self.phases > 1
        if not shuffle and project is None and self._warp_specialised(
                src, out, frame, lrelu=lrelu, res1=res1, scale=scale, res2=res2, grow=grow, sums_in=sums_in):
            return
        h, w = frame
        rows = src.shape[0]
        key = self.tuning_key(rows, project=project is not None)
        klass = key[2]
        plain_out = src if shuffle or project is not None else out  # a descriptor the kernel does not use
        x_d, w_d, out_d = (_descriptor(t) for t in (src, self.weight, plain_out))
        w2_d, out2_d = (_descriptor(self.weight), _descriptor(plain_out)) if self.cout2 else (w_d, out_d)
        r1_d, r2_d = (_descriptor(t) if t is not None else out_d for t in (res1, res2))
        descs = (x_d, w_d, w2_d, out_d, out2_d, r1_d, r2_d)
        args = (x_d, w_d, w2_d, self.bias, out_d, out2_d, r1_d, r2_d, out,
                self.bias if project is None else project.weight, rows, (h + 2) * (w + 2), w + 2, h, w, klass,
                0.2, scale, scale2)
        flags = dict(CIN=self.cin, COUT=self.cout1, COUT2=self.cout2, BIAS=self.has_bias, LRELU=lrelu,
                     RES1=res1 is not None, RES2=res2 is not None, GROW=grow, SUMS_IN=sums_in, SHUFFLE=shuffle,
                     PROJECT=0, TAP_OUTS=0, PLANE=0)
        if project is not None:
            flags.update(PROJECT=project.weight.shape[1], TAP_OUTS=project.outs, PLANE=project.plane)
        if not src.is_cuda:
            # a few programs, each walking over several tiles: the persistent loop is exercised too
            config = triton.Config({"BLOCK_M": 32, "BLOCK_K": 16, "PERSISTENT": True})
            grid = (3, self.phases)
        else:
            if key not in TUNED:
                # a shape with no tuned tile yet: the autotuner picks one, used directly from then on. It
                # runs the kernel many times, so a step that adds partial sums in place gets them back
                # and runs once more on them (only such a step: the autotuner's own `restore_value`
                # would copy every layer's output, gigabytes for the tail's at 4x).
                saved = out.clone() if sums_in else None
                conv3x3_tuned[lambda meta: launch_grid(rows, meta) + (self.phases,)](*args, **flags)
                TUNED[key] = conv3x3_tuned.best_config
                if saved is None:
                    return
                out.copy_(saved)
            config = TUNED[key]
            grid = launch_grid(rows, config.kwargs) + (self.phases,)
        _set_block_shapes({**config.kwargs, **flags, **dict(zip(DESCRIPTORS, descs))})
        launch = dict(**flags, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        if config.maxnreg is not None:
            launch["maxnreg"] = config.maxnreg
        if _recorded is not None:
            _recorded.append((conv3x3_kernel, grid, args, launch))
            return
        conv3x3_kernel[grid](*args, **launch)

    def _warp_specialised(self, src, out, frame, *, lrelu, res1, scale, res2, grow, sums_in) -> bool:
        """Launch (or record) this convolution in the warp-specialised Gluon kernel where one serves it;
        returns whether it did."""
        if not WARP_SPECIALISED:
            return False
        kind = warp_specialised_conv.kind_of(bias=self.has_bias, lrelu=lrelu, grow=grow, sums_in=sums_in,
                                             residuals=(res1 is not None) + (res2 is not None))
        tile = warp_specialised_conv.TILES.get((self.cin, self.cout, kind))
        key = (self.cin, self.cout, kind, tile)
        if tile is None or key in _ws_failed or not warp_specialised_conv.available(src.device):
            return False
        grid, args, constants = warp_specialised_conv.launch_args(src, self.weight, self.bias, out, frame, tile, kind,
                                                                  res1=res1, scale=scale, grow=grow)
        if _recorded is not None:
            _recorded.append((warp_specialised_conv.conv3x3_ws_kernel, grid, args, constants))
            return True
        try:
            warp_specialised_conv.launch(grid, args, constants)
        except Exception:  # a Triton whose Gluon does not take this kernel: the Triton kernel is as exact
            log.warning("the warp-specialised kernel for %s does not compile here; the Triton kernel serves it",
                        key, exc_info=True)
            _ws_failed.add(key)
            return False
        return True


TAPS_BLOCK = 1024  # pixels per program of `taps_sum_kernel`


class TapShares:
    """A 3x3 convolution with few outputs (conv_last: 64 channels -> 3) in two halves: the layer before
    it stores, instead of its own output, each tap's share of this convolution (its `project`), and
    calling this adds the nine shares up. The 64-channel input is then neither stored nor read nine
    times: 9 x 3 shares are written and read where 64 channels were written and 9 x 64 read."""

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype):
        outs, cin = conv.out_channels, conv.in_channels
        self.outs, self.plane = outs, triton.next_power_of_2(outs)
        columns = conv.weight.detach().permute(1, 2, 3, 0).reshape(cin, 9 * outs)  # [in, (tap, out)]
        width = max(16, triton.next_power_of_2(9 * outs))
        self.weight = torch.cat([columns, columns.new_zeros(cin, width - 9 * outs)], 1).to(dtype).contiguous()
        self.bias = conv.bias.detach().float().contiguous()

    def buffer(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """Where the layer before stores the shares of `rows` padded rows: one plane per tap."""
        return torch.empty((9, rows, self.plane), dtype=like.dtype, device=like.device)

    def __call__(self, shares: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
        """The convolution's output, (N, outs, H, W) in the channels-last memory format."""
        pixels = n * h * w
        out = torch.empty((n, h, w, self.plane), dtype=shares.dtype, device=shares.device)
        grid, args = (triton.cdiv(pixels, TAPS_BLOCK),), (shares, self.bias, out, pixels, shares.shape[1], h, w)
        constants = dict(TAP_OUTS=self.outs, PLANE=self.plane, BLOCK=TAPS_BLOCK)
        if _recorded is not None:
            _recorded.append((taps_sum_kernel, grid, args, constants))
        else:
            taps_sum_kernel[grid](*args, **constants)
        return out[..., :self.outs].permute(0, 3, 1, 2)


def dense_steps(rdb: nn.Module, feat: int, grow: int, dtype: torch.dtype) -> list[PackedConv]:
    """conv1..conv4 of a dense block regrouped by input: step j reads only the newest features x_j
    (x, then x1, x2, x3) and computes their share of every later convolution at once (conv_(j+1)
    finished, conv_(j+2).. as partial sums): 128, 96, 64 and 32 output columns, instead of four GEMMs
    with 32, which keeps the tensor cores busier per byte of input brought on chip. Every bias is added
    in step 0, where each convolution starts; the later steps find it in the partial sums."""
    convs = [rdb.conv1, rdb.conv2, rdb.conv3, rdb.conv4]
    steps = []
    for j in range(4):
        cin = feat if j == 0 else grow
        first = 0 if j == 0 else feat + (j - 1) * grow
        targets = convs[j:]
        weight = torch.cat([conv.weight[:, first:first + cin] for conv in targets])
        steps.append(PackedConv(weight, torch.cat([conv.bias for conv in targets]) if j == 0 else None, dtype))
    return steps


def dense_step_views(buf: torch.Tensor, j: int, feat: int, grow: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where dense step j reads and writes in the RDB's buffer [rows, F + 4G]: (input, output).

    The output runs from x_(j+1)'s channels to the buffer's end: the step's own convolution lands in
    x_(j+1)'s channels, its partial sums of the later convolutions in those of x_(j+2).., which are
    not written yet; the next step adds them and overwrites them. No side buffer, no scratch columns."""
    src = buf[:, :feat] if j == 0 else buf[:, feat + (j - 1) * grow: feat + j * grow]
    return src, buf[:, feat + j * grow:]


def pad_frames(feat: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, H, W) features -> a zero-padded flat buffer [N * (H + 2) * (W + 2), channels]."""
    n, c, h, w = feat.shape
    buffer = torch.zeros((n * (h + 2) * (w + 2), channels), dtype=feat.dtype, device=feat.device)
    buffer.view(n, h + 2, w + 2, channels)[:, 1:h + 1, 1:w + 1, :c] = feat.permute(0, 2, 3, 1)
    return buffer


def zero_ring(buffer: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """Zero the one-pixel ring around each frame of a padded flat buffer (its inside is left as it is)."""
    frames = buffer.view(n, h + 2, w + 2, buffer.shape[1])
    for ring in (frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]):
        ring.zero_()
    return buffer


def unpad_frames(buffer: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """A padded flat buffer -> (N, C, H, W) in the channels-last memory format."""
    c = buffer.shape[1]
    inner = buffer.view(n, h + 2, w + 2, c)[:, 1:h + 1, 1:w + 1, :]
    return inner.contiguous().permute(0, 3, 1, 2)


def _widths(model: nn.Module) -> tuple[int, int]:
    """RRDBNet's feature and growth channel counts (F, G)."""
    return model.conv_first.out_channels, model.body[0].rdb1.conv1.out_channels


def fused_unsupported_reason(model: nn.Module, device: torch.device) -> str | None:
    """Why the fused engine cannot run this model here, or None when it can."""
    if not hasattr(model, "conv_first") or getattr(model, "scale", None) != 4:
        return "the fused engine runs the x4 RRDBNet only"
    feat, grow = _widths(model)
    if any(c < 16 or c & (c - 1) for c in (feat, grow)):
        return f"the fused engine needs power-of-two channel counts of at least 16 (got {feat}/{grow})"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return "the fused engine needs TMA (compute capability 9.0 or later)"
    return None


class FusedRRDBNet(nn.Module):
    """RRDBNet (scale 4) with its trunk run by the fused kernels. Input/output as RRDBNet's."""

    def __init__(self, model: nn.Module, compile_head_tail: bool = False):
        """`compile_head_tail`: RRDBNet's own head and tail under `torch.compile` (symbolic sizes)
        instead of the Triton tail and cuDNN's head (kept to compare them: BENCHMARKS.md)."""
        super().__init__()
        self.model = model
        self.dtype = dtype = model.conv_first.weight.dtype
        self.feat, self.grow = _widths(model)
        self.blocks = [
            [(dense_steps(rdb, self.feat, self.grow, dtype), PackedConv.of(rdb.conv5, dtype))
             for rdb in (block.rdb1, block.rdb2, block.rdb3)]
            for block in model.body
        ]
        self.conv_body = PackedConv.of(model.conv_body, dtype)
        self.head = torch.compile(self._head, dynamic=True) if compile_head_tail else self._head
        self.tail = torch.compile(self._tail, dynamic=True) if compile_head_tail else self._triton_tail
        # the tail in the fused kernels: each "nearest 2x + conv" in four phases (their results put in
        # place by the kernel), conv_hr storing conv_last's per-tap shares. They run on 4 to 16 times
        # the input's rows, so always with the larger size class's tile shapes: fewer kernels to compile.
        large = len(SIZE_CLASS_ROWS)
        self.up1, self.up2 = (PackedConv.up(conv, dtype, tuned_class=large) for conv in (model.conv_up1, model.conv_up2))
        self.conv_hr = PackedConv.of(model.conv_hr, dtype, tuned_class=large)
        self.conv_last = TapShares(model.conv_last, dtype)
        self.cudnn_up: tuple[UpConv, UpConv] | None = None  # built by `_subpixel_tail`, only if it runs

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return pad_frames(self.model.conv_first(x), self.feat)

    def _tail(self, trunk: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
        m = self.model
        feat = unpad_frames(trunk, n, h, w)
        feat = m.lrelu(m.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = m.lrelu(m.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return m.conv_last(m.lrelu(m.conv_hr(feat)))

    def compile_tail_in_background(self, n: int, sizes) -> threading.Thread:
        """Compile RRDBNet's own tail (`torch.compile`, symbolic sizes, run on a batch of `n` frames
        of each (width, height) of `sizes`) on a thread of its own, and serve it
        once it has run. Until then, or if compiling fails, the Triton tail serves."""
        compiled = torch.compile(self._tail, dynamic=True)

        def compile_and_switch() -> None:
            started = time.monotonic()
            device = self.model.conv_first.weight.device
            try:
                with torch.inference_mode():
                    for w, h in sizes:
                        trunk = torch.zeros((n * (h + 2) * (w + 2), self.feat), dtype=self.dtype, device=device)
                        compiled(trunk, n, h, w)
            except Exception:  # the eager tail is as exact; only slower
                log.exception("compiling the tail failed; the eager tail goes on")
                return
            self.tail = compiled
            log.info("compiled tail in use after %.1f s", time.monotonic() - started)

        thread = threading.Thread(target=compile_and_switch, name="compile-tail", daemon=True)
        thread.start()
        return thread

    def _subpixel_tail(self, trunk: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
        """The tail through cuDNN, the up-sampling as sub-pixel convolutions (kept to compare: bench/tail.py)."""
        m = self.model
        if self.cudnn_up is None:
            self.cudnn_up = UpConv(m.conv_up1), UpConv(m.conv_up2)
        feat = self.cudnn_up[1](self.cudnn_up[0](unpad_frames(trunk, n, h, w)))
        return m.conv_last(m.lrelu(m.conv_hr(feat)))

    def _triton_tail(self, trunk: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
        """The tail on padded flat buffers, in the trunk's kernel: no compiler, no element-wise pass."""
        feat = trunk
        for up in (self.up1, self.up2):
            larger = zero_ring(torch.empty((n * (2 * h + 2) * (2 * w + 2), self.feat), dtype=self.dtype,
                                           device=trunk.device), n, 2 * h, 2 * w)
            up(feat, larger, (h, w), lrelu=True)
            feat, h, w = larger, 2 * h, 2 * w
        shares = self.conv_last.buffer(feat.shape[0], feat)
        self.conv_hr(feat, shares, (h, w), lrelu=True, project=self.conv_last)
        del feat
        return self.conv_last(shares, n, h, w)

    def trunk(self, feat_padded: torch.Tensor, frame: tuple[int, int]) -> torch.Tensor:
        """conv_body(body(feat)) + feat on padded flat buffers [rows, F]."""
        feat, grow = self.feat, self.grow
        rows = feat_padded.shape[0]
        new = lambda channels: torch.empty((rows, channels), dtype=self.dtype, device=feat_padded.device)  # noqa: E731
        buffers = [new(feat + 4 * grow) for _ in range(4)]
        buffers[0][:, :feat] = feat_padded
        with warp_specialised_conv.descriptors_reused():
            current = self._blocks_on(buffers, frame)
        out = new(feat)
        self.conv_body(buffers[current][:, :feat], out, frame, res1=feat_padded, scale=1.0)
        return out

    def _blocks_on(self, buffers: list[torch.Tensor], frame: tuple[int, int]) -> int:
        """The RRDBs over the four RDB buffers in turn, the first holding the trunk's input: returns
        which holds their output."""
        feat, grow = self.feat, self.grow
        current = 0
        for rdbs in self.blocks:
            rrdb_in = buffers[current]
            order = [current, (current + 1) % 4, (current + 2) % 4, (current + 3) % 4]
            for i, (steps, conv5) in enumerate(rdbs):
                buf = buffers[order[i]]
                for j, step in enumerate(steps):
                    src, out = dense_step_views(buf, j, feat, grow)
                    step(src, out, frame, lrelu=True, grow=grow, sums_in=j > 0)
                nxt = buffers[order[i + 1]]
                if i < 2:
                    conv5(buf, nxt[:, :feat], frame, res1=buf[:, :feat], scale=0.2)
                else:  # the RRDB's residual too: ((conv * 0.2 + rdb3 input) * 0.2 + rrdb input)
                    conv5(buf, nxt[:, :feat], frame, res1=buf[:, :feat], scale=0.2, res2=rrdb_in[:, :feat], scale2=0.2)
            current = order[3]
        return current

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return self.tail(self.trunk(self.head(x), (h, w)), n, h, w)
