"""Warp-specialised 3x3 convolutions for Hopper, written in Gluon (Triton's explicit kernel language).

The same convolutions as `fused_trunk.conv3x3_kernel`, on the same padded flat buffers, for the
layers of the trunk's dense blocks: the four dense steps (step 0 with the biases, the later ones
adding their partial sums in place, LeakyReLU on their own convolution's columns) and conv5 (bias,
times 0.2, plus the block's input). `tl.dot`'s pipeline runs a tile's epilogue after its main loop
in the same warps; here the work is split:

- one producer warp issues every TMA load (a tap's rows of the input, the weights they meet) into a
  ring of stages, each once the consumer that read it last has released it; where they fit (the
  dense steps after the first: 18-55 KB), all the weights are loaded once and stay (`RESIDENT`);
- two consumer warpgroups take a program's tiles in turn, and take turns at the tensor cores, so that
  one's epilogue runs while the other multiplies; a tile's residual or partial sums arrive by TMA
  during its main loop into the buffer its result then leaves from by TMA.

On an H200 (BENCHMARKS.md) at 640x480 (4 frames) this takes dense step 0 from 325 to 300 µs, step 1
from 258 to 193, step 2 from 177 to 149, step 3 from 143 to 109 and conv5 from 580 to 563, with the
same pixels. Gluon kernels do not run in Triton's interpreter: off the GPU the Triton kernel serves
and is what the tests run; the tests compile these for sm90, and `bench/gluon_conv.py` checks them
against it on a GPU.
"""

import contextlib
import functools
import threading

import torch
import triton
from triton.runtime import driver

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, \
        warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton import knobs
except ImportError:  # a Triton without Gluon: the Triton kernel serves every layer
    gluon = None

# Tile shapes (pixels a tile, channels a step, stages, whether the weights stay in shared memory),
# the best of 4-7 measured on an H200 at 640x480 (BENCHMARKS.md), by the layer's (input channels,
# output channels, kind): "first" (dense step 0: bias, no partial sums in), "sums" (the dense steps
# after it), "residual" (conv5; the third RDB's, which adds the RRDB's input too, was slower here
# than in the Triton kernel).
TILES = {
    (64, 128, "first"): (128, 64, 5, False),
    (32, 96, "sums"): (128, 32, 8, True),
    (32, 64, "sums"): (256, 32, 6, False),
    (32, 32, "sums"): (256, 32, 6, True),
    (192, 64, "residual"): (256, 64, 4, False),
}


@functools.cache
def available(device: torch.device) -> bool:
    """Whether these kernels can run on `device`: Hopper's warpgroup MMA (sm90 exactly) and a Triton with Gluon."""
    if gluon is None or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def kind_of(*, bias: bool, lrelu: bool, grow: int, sums_in: bool, residuals: int) -> str | None:
    """Which of the trunk's layer kinds a convolution is (see `TILES`), or None for any other."""
    if bias and not lrelu and not grow and not sums_in and residuals == 1:
        return "residual"
    if lrelu and grow and residuals == 0 and bias != sums_in:
        return "sums" if sums_in else "first"
    return None


if gluon is not None:
    @gluon.jit
    def _producer(x_desc, w_desc, w2_desc, a_bufs, b_bufs, b2_bufs, ready, empty, weights_in, rows, row_pitch,
                  CIN: gl.constexpr, COUT: gl.constexpr, COUT2: gl.constexpr, BP: gl.constexpr, BK: gl.constexpr,
                  S: gl.constexpr, RESIDENT: gl.constexpr):
        """One warp: the loads of every (tap, channel step) of every tile of this program, in order
        (RESIDENT: the weights once, before them)."""
        ks: gl.constexpr = CIN // BK
        steps: gl.constexpr = 9 * ks
        w_bytes: gl.constexpr = w_desc.block_type.nbytes + (w2_desc.block_type.nbytes if COUT2 > 0 else 0)
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        total = gl.cdiv(gl.cdiv(rows, BP) - pid, nprog) * steps
        if RESIDENT:
            mbarrier.expect(weights_in, steps * w_bytes)
            for block in gl.static_range(steps):
                tma.async_copy_global_to_shared(w_desc, [block * BK, 0], weights_in, b_bufs.index(block))
                if COUT2 > 0:
                    tma.async_copy_global_to_shared(w2_desc, [block * BK, COUT], weights_in, b2_bufs.index(block))
        for j in range(total):
            s = j % S
            mbarrier.wait(empty.index(s), ((j // S) & 1) ^ 1)  # the fill before this one was released
            step = j % steps
            tap = step // ks
            k0 = (step % ks) * BK
            row0 = (pid + (j // steps) * nprog) * BP
            shift = (tap // 3 - 1) * row_pitch + (tap % 3 - 1)
            if RESIDENT:
                mbarrier.expect(ready.index(s), x_desc.block_type.nbytes)
            else:
                mbarrier.expect(ready.index(s), x_desc.block_type.nbytes + w_bytes)
                tma.async_copy_global_to_shared(w_desc, [tap * CIN + k0, 0], ready.index(s), b_bufs.index(s))
                if COUT2 > 0:
                    tma.async_copy_global_to_shared(w2_desc, [tap * CIN + k0, COUT], ready.index(s), b2_bufs.index(s))
            tma.async_copy_global_to_shared(x_desc, [row0 + shift, k0], ready.index(s), a_bufs.index(s))

    @gluon.jit
    def _finish(value, buffer, out_desc, column0, row0, frame_rows, row_pitch, H, W, bias_ptr, scale, slope,
                layout: gl.constexpr, BP: gl.constexpr, N: gl.constexpr,
                GROW: gl.constexpr, BIAS: gl.constexpr, SUMS_IN: gl.constexpr, RES: gl.constexpr):
        """A block of a tile's output columns [column0, column0 + N): its epilogue (see the kernel), stored
        through `buffer`, which holds its partial sums or residual by now."""
        row = row0 + gl.arange(0, BP, layout=gl.SliceLayout(1, layout))[:, None]
        column = gl.arange(0, N, layout=gl.SliceLayout(0, layout))[None, :]
        in_frame = row % frame_rows
        y = in_frame // row_pitch
        x = in_frame % row_pitch
        inside = (y >= 1) & (y <= H) & (x >= 1) & (x <= W)
        if BIAS:
            value = value + gl.load(bias_ptr + column0 + column)
        if SUMS_IN:
            value = value + buffer.load(layout).to(gl.float32)
        if GROW > 0:  # a dense step: LeakyReLU on its own convolution's columns, the partial sums as they are
            value = gl.maximum(value, value * gl.where(column0 + column < GROW, slope, 1.0))
        if RES:  # conv5: (conv + bias) * scale + residual
            value = value * scale + buffer.load(layout).to(gl.float32)
        buffer.store(gl.where(inside, value, 0.0).to(out_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [row0, column0], buffer)

    @gluon.jit
    def _consumer(C: gl.constexpr, a_bufs, b_bufs, b2_bufs, ready, empty, turn, epilogue, epilogue2, landed,
                  weights_in, res_desc, out_desc, out2_desc, bias_ptr, rows, frame_rows,
                  row_pitch, H, W, scale, slope,
                  CIN: gl.constexpr, COUT: gl.constexpr, COUT2: gl.constexpr, BP: gl.constexpr, BK: gl.constexpr,
                  S: gl.constexpr, GROW: gl.constexpr, BIAS: gl.constexpr, SUMS_IN: gl.constexpr, RES: gl.constexpr,
                  RESIDENT: gl.constexpr):
        """A warpgroup taking every other tile of this program (C = 0: the even ones)."""
        steps: gl.constexpr = 9 * (CIN // BK)
        loads_in: gl.constexpr = SUMS_IN or RES  # the tile's partial sums or residual come by TMA
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, COUT, 16])
        acc2_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                              instr_shape=[16, max(COUT2, 8), 16])
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        my_tiles = gl.cdiv(gl.cdiv(rows, BP) - pid, nprog)
        buffer = epilogue.index(C)
        buffer2 = epilogue2.index(C)
        if RESIDENT:
            mbarrier.wait(weights_in, 0)
        k = 0
        for local in range(C, my_tiles, 2):
            # Turns: this warpgroup's k-th main loop starts once the other's before it has seen all its
            # loads, so that no stage's barrier is ever waited on two fills ahead.
            if C == 1:
                mbarrier.wait(turn.index(1), k & 1)
            elif k > 0:
                mbarrier.wait(turn.index(0), (k - 1) & 1)
            row0 = (pid + local * nprog) * BP
            tma.store_wait(0)  # the previous tile's result has left the buffers
            if loads_in:
                if COUT2 > 0:  # partial sums (SUMS_IN: res_desc is out_desc)
                    mbarrier.expect(landed.index(C), res_desc.block_type.nbytes + out2_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(out2_desc, [row0, COUT], landed.index(C), buffer2)
                else:
                    mbarrier.expect(landed.index(C), res_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(res_desc, [row0, 0], landed.index(C), buffer)
            acc = gl.zeros([BP, COUT], gl.float32, acc_layout)
            if COUT2 > 0:
                acc2 = gl.zeros([BP, COUT2], gl.float32, acc2_layout)
            g0 = local * steps
            for step in range(steps):
                g = g0 + step
                stage = g % S
                mbarrier.wait(ready.index(stage), (g // S) & 1)
                weights = step if RESIDENT else stage
                acc = warpgroup_mma(a_bufs.index(stage), b_bufs.index(weights), acc, use_acc=step != 0, is_async=True)
                if COUT2 > 0:
                    acc2 = warpgroup_mma(a_bufs.index(stage), b2_bufs.index(weights), acc2, use_acc=step != 0,
                                         is_async=True)
                    acc, acc2 = warpgroup_mma_wait(2, deps=[acc, acc2])
                else:
                    acc = warpgroup_mma_wait(1, deps=[acc])
                if step > 0:  # the products before these are done: release their stage
                    mbarrier.arrive(empty.index((g - 1) % S), count=1)
            mbarrier.arrive(turn.index(1 - C), count=1)
            if COUT2 > 0:
                acc, acc2 = warpgroup_mma_wait(0, deps=[acc, acc2])
            else:
                acc = warpgroup_mma_wait(0, deps=[acc])
            mbarrier.arrive(empty.index((g0 + steps - 1) % S), count=1)
            if loads_in:
                mbarrier.wait(landed.index(C), k & 1)
            _finish(acc, buffer, out_desc, 0, row0, frame_rows, row_pitch, H, W, bias_ptr, scale, slope, acc_layout,
                    BP, COUT, GROW, BIAS, SUMS_IN, RES)
            if COUT2 > 0:
                _finish(acc2, buffer2, out2_desc, COUT, row0, frame_rows, row_pitch, H, W, bias_ptr, scale, slope,
                        acc2_layout, BP, COUT2, GROW, BIAS, SUMS_IN, RES)
            k += 1
        tma.store_wait(0)

    @gluon.jit(do_not_specialize=["rows", "frame_rows", "row_pitch", "H", "W"])
    def conv3x3_ws_kernel(x_desc, w_desc, w2_desc, res_desc, out_desc, out2_desc, bias_ptr, rows, frame_rows,
                          row_pitch, H, W, scale, slope,
                          CIN: gl.constexpr, COUT: gl.constexpr, COUT2: gl.constexpr, BP: gl.constexpr,
                          BK: gl.constexpr, S: gl.constexpr, GROW: gl.constexpr, BIAS: gl.constexpr,
                          SUMS_IN: gl.constexpr, RES: gl.constexpr, RESIDENT: gl.constexpr):
        """out = conv(x), then: + bias (BIAS); + the partial sums `out` holds (SUMS_IN, res = out);
        LeakyReLU on columns [0, GROW) (GROW > 0); times `scale` plus res (RES). Zeros on the frames'
        rings. COUT2 > 0: a second block of output columns
        [COUT, COUT + COUT2) (w2_desc, out2_desc: the same tensors as w_desc, out_desc), since the
        blocks' widths are powers of two (a dense step's 96 = 64 + 32). RESIDENT: all the weights stay
        in shared memory (only the input moves through the stages)."""
        steps: gl.constexpr = 9 * (CIN // BK)
        a_bufs = gl.allocate_shared_memory(x_desc.dtype, [S, BP, BK], x_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [steps if RESIDENT else S, BK, COUT], w_desc.layout)
        epilogue = gl.allocate_shared_memory(out_desc.dtype, [2, BP, COUT], out_desc.layout)
        if COUT2 > 0:
            b2_bufs = gl.allocate_shared_memory(w2_desc.dtype, [steps if RESIDENT else S, BK, COUT2], w2_desc.layout)
            epilogue2 = gl.allocate_shared_memory(out2_desc.dtype, [2, BP, COUT2], out2_desc.layout)
        else:  # not used
            b2_bufs = b_bufs
            epilogue2 = epilogue
        ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        landed = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        weights_in = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for stage in gl.static_range(S):
            mbarrier.init(ready.index(stage), count=1)
            mbarrier.init(empty.index(stage), count=1)
        for c in gl.static_range(2):
            mbarrier.init(turn.index(c), count=1)
            mbarrier.init(landed.index(c), count=1)
        mbarrier.init(weights_in, count=1)
        fence_async_shared()
        gl.warp_specialize([
            (_consumer, (0, a_bufs, b_bufs, b2_bufs, ready, empty, turn, epilogue, epilogue2, landed, weights_in,
                         res_desc, out_desc, out2_desc, bias_ptr, rows, frame_rows, row_pitch,
                         H, W, scale, slope, CIN, COUT, COUT2, BP, BK, S, GROW, BIAS, SUMS_IN, RES, RESIDENT)),
            (_consumer, (1, a_bufs, b_bufs, b2_bufs, ready, empty, turn, epilogue, epilogue2, landed, weights_in,
                         res_desc, out_desc, out2_desc, bias_ptr, rows, frame_rows, row_pitch,
                         H, W, scale, slope, CIN, COUT, COUT2, BP, BK, S, GROW, BIAS, SUMS_IN, RES, RESIDENT)),
            (_producer, (x_desc, w_desc, w2_desc, a_bufs, b_bufs, b2_bufs, ready, empty, weights_in, rows, row_pitch,
                         CIN, COUT, COUT2, BP, BK, S, RESIDENT)),
        ], [4, 1], [232, 40])


def _blocks(cout: int) -> tuple[int, int]:
    """A layer's output columns as the kernel's two blocks (powers of two): 96 = 64 + 32, 64 = 64 + 0."""
    first = 1 << (cout.bit_length() - 1)
    return first, cout - first


def _descriptor_blocks(cout: int, tile: tuple[int, int, int, bool]) -> dict[str, tuple[int, int]]:
    """The block shape of each of the kernel's descriptors, in its argument order (without a second
    block of columns, that block's descriptors take the first's shape and go unused)."""
    bp, bk = tile[:2]
    cout1, cout2 = _blocks(cout)
    second = cout2 or cout1
    return {"x_desc": (bp, bk), "w_desc": (bk, cout1), "w2_desc": (bk, second), "res_desc": (bp, cout1),
            "out_desc": (bp, cout1), "out2_desc": (bp, second)}


def _constants(cin: int, cout: int, tile: tuple[int, int, int, bool], kind: str, grow: int) -> dict:
    bp, bk, stages, resident = tile
    cout1, cout2 = _blocks(cout)
    return dict(CIN=cin, COUT=cout1, COUT2=cout2, BP=bp, BK=bk, S=stages, GROW=grow,
                BIAS=kind in ("first", "residual"), SUMS_IN=kind == "sums",
                RES=kind == "residual", RESIDENT=resident)


def source_for(cin: int, cout: int, tile: tuple[int, int, int, bool], kind: str, grow: int = 0):
    """The kernel specialised for a layer, to compile without a GPU (`triton.compile(source, target=...)`)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    signature = {name: f"tensordesc<fp16[{block[0]}, {block[1]}],{_layout(block, torch.float16)!r}>"
                 for name, block in _descriptor_blocks(cout, tile).items()}
    signature.update({"bias_ptr": "*fp32", "rows": "i32", "frame_rows": "i32", "row_pitch": "i32", "H": "i32",
                      "W": "i32", "scale": "fp32", "slope": "fp32"})
    constants = _constants(cin, cout, tile, kind, grow)
    return GluonASTSource(conv3x3_ws_kernel, {**signature, **{name: "constexpr" for name in constants}}, constants)


@functools.cache
def _layout(block: tuple[int, int], dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.float16 if dtype == torch.float16 else gl.bfloat16)


@functools.cache
def _programs(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# A thread's descriptors made so far while `descriptors_reused`, by (address, shape, strides, block);
# each keeps its tensor alive, so that no other tensor takes that address meanwhile.
_reused = threading.local()


@contextlib.contextmanager
def descriptors_reused():
    """Within it (on this thread), the descriptor of a tensor view for a block shape is made once: a
    forward pass makes the same few dozen about 30 times each, and making one costs more CPU than
    launching with it."""
    _reused.descriptors = {}
    try:
        yield
    finally:
        _reused.descriptors = None


def descriptor(t: torch.Tensor, block: tuple[int, int]) -> "TensorDescriptor":
    """A host TMA descriptor of `t` for blocks of `block`, in the shared-memory layout the kernels expect."""
    made = getattr(_reused, "descriptors", None)
    if made is None:
        return TensorDescriptor.from_tensor(t, list(block), _layout(block, t.dtype))
    key = (t.data_ptr(), t.shape, t.stride(), block)
    if key not in made:
        made[key] = TensorDescriptor.from_tensor(t, list(block), _layout(block, t.dtype))
    return made[key]


# Each specialisation once compiled, by (device, dtype, constants): later launches go straight to its
# launcher. Triton's JIT binds, specialises and looks up every argument of every launch first, which
# costs about as much CPU as the launch itself; at small frame sizes a forward pass's ~300 launches
# take longer on the CPU than on the GPU (engine/graphs.py).
_compiled: dict = {}


def launch(grid: tuple[int], args: tuple, constants: dict) -> None:
    """`conv3x3_ws_kernel[grid](*args, **constants)` (see `launch_args`)."""
    base = args[0].base
    key = (base.device.index, base.dtype, *constants.items())
    compiled = _compiled.get(key)
    if compiled is None:  # the first launch of a specialisation: through the JIT, which compiles it
        _compiled[key] = conv3x3_ws_kernel[grid](*args, **constants)
        return
    # every parameter in order, the constexprs' values included, as the JIT passes them
    bound = (*args, *(constants[p.name] for p in conv3x3_ws_kernel.params[len(args):]))
    stream = driver.active.get_current_stream(base.device.index)
    compiled.run(grid[0], 1, 1, stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *bound), knobs.runtime.launch_enter_hook,
                 knobs.runtime.launch_exit_hook, *bound)


def launch_args(src: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, frame: tuple[int, int],
                tile: tuple[int, int, int, bool], kind: str, *, res1: torch.Tensor | None = None,
                scale: float = 1.0, slope: float = 0.2, grow: int = 0):
    """(grid, args, constants) of `conv3x3_ws_kernel` for one convolution of `kind` (see `TILES` and the
    kernel's docstring; a dense step's partial sums are read from `out`)."""
    h, w = frame
    rows = src.shape[0]
    grid = (min(_programs(src.device), triton.cdiv(rows, tile[0])),)
    tensors = (src, weight, weight, out if res1 is None else res1, out, out)  # as `_descriptor_blocks` lists them
    blocks = _descriptor_blocks(out.shape[1], tile).values()
    args = (*(descriptor(t, block) for t, block in zip(tensors, blocks)), bias, rows, (h + 2) * (w + 2), w + 2, h, w,
            scale, slope)
    return grid, args, dict(_constants(src.shape[1], out.shape[1], tile, kind, grow), num_warps=4)
