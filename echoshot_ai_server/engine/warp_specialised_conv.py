"""Warp-specialised 3x3 convolutions for Hopper, written in Gluon (Triton's explicit kernel language).

The same convolutions as `fused_trunk.conv3x3_kernel`, on the same padded flat buffers, for the
trunk's layers whose epilogue moves the most bytes next to their products: conv5 (bias, times 0.2,
plus the block's input) and the dense steps after the first with one block of output columns (their
partial sums in place, LeakyReLU on their own convolution's columns). `tl.dot`'s pipeline runs a
tile's epilogue after its main loop in the same warps; here the work is split:

- one producer warp issues every TMA load (a tap's rows of the input, the weights they meet) into a
  ring of stages, each once the consumer that read it last has released it;
- two consumer warpgroups take a program's tiles in turn, and take turns at the tensor cores, so that
  one's epilogue runs while the other multiplies; a tile's residual or partial sums arrive by TMA
  during its main loop into the buffer its result then leaves from by TMA.

On an H200 (BENCHMARKS.md) this takes dense step 3 from 144 to 129 µs, step 2 from 173 to 145 and
conv5 from 580 to 563 at 640x480 (4 frames), with the same pixels. Gluon kernels do not run in
Triton's interpreter: off the GPU the Triton kernel serves and is what the tests run; the tests
compile these for sm90, and `bench/gluon_conv.py` checks them against it on a GPU.
"""

import functools

import torch
import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, \
        warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # a Triton without Gluon: the Triton kernel serves every layer
    gluon = None

# Tile shapes (pixels a tile, channels a step, stages), measured on an H200 at 640x480 (BENCHMARKS.md),
# by the layer's (input channels, output channels, kind): "residual" (conv5) or "sums" (dense steps).
TILES = {
    (192, 64, "residual"): (256, 64, 4),
    (32, 64, "sums"): (128, 32, 12),
    (32, 32, "sums"): (256, 32, 6),
}


@functools.cache
def available(device: torch.device) -> bool:
    """Whether these kernels can run on `device`: Hopper's warpgroup MMA (sm90 exactly) and a Triton with Gluon."""
    if gluon is None or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def tile_for(cin: int, cout: int, *, bias: bool, lrelu: bool, grow: int, sums_in: bool,
             residuals: int) -> tuple[int, int, int] | None:
    """The tile shape to run a convolution with here, or None where the Triton kernel serves it:
    conv5's kind (bias, one residual, no activation) or a dense step after the first (partial sums
    in, LeakyReLU on its first `grow` columns, no bias, no residual), in the shapes of `TILES`."""
    if bias and not lrelu and not grow and not sums_in and residuals == 1:
        return TILES.get((cin, cout, "residual"))
    if sums_in and lrelu and grow and not bias and residuals == 0:
        return TILES.get((cin, cout, "sums"))
    return None


if gluon is not None:
    @gluon.jit
    def _producer(x_desc, w_desc, a_bufs, b_bufs, ready, empty, rows, row_pitch,
                  CIN: gl.constexpr, BP: gl.constexpr, BK: gl.constexpr, S: gl.constexpr):
        """One warp: the loads of every (tap, channel step) of every tile of this program, in order."""
        ks: gl.constexpr = CIN // BK
        steps: gl.constexpr = 9 * ks
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        total = gl.cdiv(gl.cdiv(rows, BP) - pid, nprog) * steps
        for j in range(total):
            s = j % S
            mbarrier.wait(empty.index(s), ((j // S) & 1) ^ 1)  # the fill before this one was released
            step = j % steps
            tap = step // ks
            k0 = (step % ks) * BK
            row0 = (pid + (j // steps) * nprog) * BP
            shift = (tap // 3 - 1) * row_pitch + (tap % 3 - 1)
            mbarrier.expect(ready.index(s), x_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [row0 + shift, k0], ready.index(s), a_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [tap * CIN + k0, 0], ready.index(s), b_bufs.index(s))

    @gluon.jit
    def _consumer(C: gl.constexpr, a_bufs, b_bufs, ready, empty, turn, epilogue, landed, res_desc, out_desc, bias_ptr,
                  rows, frame_rows, row_pitch, H, W, scale, slope,
                  CIN: gl.constexpr, COUT: gl.constexpr, BP: gl.constexpr, BK: gl.constexpr, S: gl.constexpr,
                  GROW: gl.constexpr):
        """A warpgroup taking every other tile of this program (C = 0: the even ones)."""
        steps: gl.constexpr = 9 * (CIN // BK)
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, COUT, 16])
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        my_tiles = gl.cdiv(gl.cdiv(rows, BP) - pid, nprog)
        buffer = epilogue.index(C)
        k = 0
        for local in range(C, my_tiles, 2):
            # Turns: this warpgroup's k-th main loop starts once the other's before it has seen all its
            # loads, so that no stage's barrier is ever waited on two fills ahead.
            if C == 1:
                mbarrier.wait(turn.index(1), k & 1)
            elif k > 0:
                mbarrier.wait(turn.index(0), (k - 1) & 1)
            row0 = (pid + local * nprog) * BP
            tma.store_wait(0)  # the previous tile's result has left the buffer
            mbarrier.expect(landed.index(C), res_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(res_desc, [row0, 0], landed.index(C), buffer)
            acc = gl.zeros([BP, COUT], gl.float32, acc_layout)
            g0 = local * steps
            for step in range(steps):
                g = g0 + step
                mbarrier.wait(ready.index(g % S), (g // S) & 1)
                acc = warpgroup_mma(a_bufs.index(g % S), b_bufs.index(g % S), acc, use_acc=step != 0, is_async=True)
                acc = warpgroup_mma_wait(1, deps=[acc])  # the product before is done: release its stage
                if step > 0:
                    mbarrier.arrive(empty.index((g - 1) % S), count=1)
            mbarrier.arrive(turn.index(1 - C), count=1)
            acc = warpgroup_mma_wait(0, deps=[acc])
            mbarrier.arrive(empty.index((g0 + steps - 1) % S), count=1)
            row = row0 + gl.arange(0, BP, layout=gl.SliceLayout(1, acc_layout))[:, None]
            column = gl.arange(0, COUT, layout=gl.SliceLayout(0, acc_layout))[None, :]
            in_frame = row % frame_rows
            y = in_frame // row_pitch
            x = in_frame % row_pitch
            inside = (y >= 1) & (y <= H) & (x >= 1) & (x <= W)
            mbarrier.wait(landed.index(C), k & 1)
            if GROW > 0:  # a dense step: its partial sums in place, LeakyReLU on its own convolution's columns
                value = acc + buffer.load(acc_layout).to(gl.float32)
                value = gl.maximum(value, value * gl.where(column < GROW, slope, 1.0))
            else:  # conv5's kind: (conv + bias) * scale + residual
                value = (acc + gl.load(bias_ptr + column)) * scale + buffer.load(acc_layout).to(gl.float32)
            buffer.store(gl.where(inside, value, 0.0).to(out_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(out_desc, [row0, 0], buffer)
            k += 1
        tma.store_wait(0)

    @gluon.jit(do_not_specialize=["rows", "frame_rows", "row_pitch", "H", "W"])
    def conv3x3_ws_kernel(x_desc, w_desc, res_desc, out_desc, bias_ptr, rows, frame_rows, row_pitch, H, W, scale, slope,
                          CIN: gl.constexpr, COUT: gl.constexpr, BP: gl.constexpr, BK: gl.constexpr, S: gl.constexpr,
                          GROW: gl.constexpr):
        """GROW = 0: out = (conv(x) + bias) * scale + res; GROW > 0 (res = out, the partial sums):
        out = LeakyReLU on columns [0, GROW) of (conv(x) + out). Zeros on the frames' rings."""
        a_bufs = gl.allocate_shared_memory(x_desc.dtype, [S, BP, BK], x_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [S, BK, COUT], w_desc.layout)
        epilogue = gl.allocate_shared_memory(out_desc.dtype, [2, BP, COUT], out_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        landed = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for stage in gl.static_range(S):
            mbarrier.init(ready.index(stage), count=1)
            mbarrier.init(empty.index(stage), count=1)
        for c in gl.static_range(2):
            mbarrier.init(turn.index(c), count=1)
            mbarrier.init(landed.index(c), count=1)
        fence_async_shared()
        gl.warp_specialize([
            (_consumer, (0, a_bufs, b_bufs, ready, empty, turn, epilogue, landed, res_desc, out_desc, bias_ptr, rows,
                         frame_rows, row_pitch, H, W, scale, slope, CIN, COUT, BP, BK, S, GROW)),
            (_consumer, (1, a_bufs, b_bufs, ready, empty, turn, epilogue, landed, res_desc, out_desc, bias_ptr, rows,
                         frame_rows, row_pitch, H, W, scale, slope, CIN, COUT, BP, BK, S, GROW)),
            (_producer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, rows, row_pitch, CIN, BP, BK, S)),
        ], [4, 1], [232, 40])


def source_for(cin: int, cout: int, tile: tuple[int, int, int], grow: int = 0):
    """The kernel specialised for a layer, to compile without a GPU (`triton.compile(source, target=...)`)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    bp, bk, stages = tile
    layout = gl.NVMMASharedLayout.get_default_for

    def descriptor(block):
        return f"tensordesc<fp16[{block[0]}, {block[1]}],{layout(block, gl.float16)!r}>"

    signature = {"x_desc": descriptor([bp, bk]), "w_desc": descriptor([bk, cout]), "res_desc": descriptor([bp, cout]),
                 "out_desc": descriptor([bp, cout]), "bias_ptr": "*fp32", "rows": "i32", "frame_rows": "i32",
                 "row_pitch": "i32", "H": "i32", "W": "i32", "scale": "fp32", "slope": "fp32"}
    constants = dict(CIN=cin, COUT=cout, BP=bp, BK=bk, S=stages, GROW=grow)
    return GluonASTSource(conv3x3_ws_kernel, {**signature, **{name: "constexpr" for name in constants}}, constants)


@functools.cache
def _layout(block: tuple[int, int], dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.float16 if dtype == torch.float16 else gl.bfloat16)


@functools.cache
def _programs(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def descriptor(t: torch.Tensor, block: tuple[int, int]) -> "TensorDescriptor":
    """A host TMA descriptor of `t` for blocks of `block`, in the shared-memory layout the kernels expect."""
    return TensorDescriptor.from_tensor(t, list(block), _layout(block, t.dtype))


def launch_args(src: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, res: torch.Tensor,
                frame: tuple[int, int], tile: tuple[int, int, int], *, scale: float = 1.0, slope: float = 0.2,
                grow: int = 0):
    """(grid, args, constants) of `conv3x3_ws_kernel` for one convolution (see its docstring)."""
    bp, bk, stages = tile
    h, w = frame
    rows, cout = src.shape[0], out.shape[1]
    grid = (min(_programs(src.device), triton.cdiv(rows, bp)),)
    args = (descriptor(src, (bp, bk)), descriptor(weight, (bk, cout)), descriptor(res, (bp, cout)),
            descriptor(out, (bp, cout)), bias, rows, (h + 2) * (w + 2), w + 2, h, w, scale, slope)
    constants = dict(CIN=src.shape[1], COUT=cout, BP=bp, BK=bk, S=stages, GROW=grow, num_warps=4)
    return grid, args, constants
