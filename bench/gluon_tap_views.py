"""Can a Hopper MMA read a convolution's taps as views of one loaded tile? (Gluon, compile only)

Each 3x3 convolution of the fused engine loads the same input rows nine times, shifted by a tap's
offset (BENCHMARKS.md: conv5 reads 78 % of what L2 delivers). Loading a tile's rows once with a few
extra ones and taking the horizontal taps as views shifted by one or two rows would cut that
threefold. `tl.dot` cannot take such views; this asks Triton's Gluon whether a `warpgroup_mma` may
read its A operand from a shared-memory slice of a TMA-loaded tile that starts `shift` rows in, for
each swizzle width. It compiles for sm90 without a GPU (`run` on one also checks the products).

    python bench/gluon_tap_views.py [run]

With Triton 3.6 and 3.8 (2026-11-28): only slices that start at a multiple of their own length
compile ("The split offset may not touch the tile"), and an unswizzled tile cannot feed the MMA
("failed to find valid wgmma layout"); so no shift of 1 or 2 rows, whatever the swizzle.
"""

import os
import sys
import tempfile

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma

SHIFTS = (0, 1, 2, 8, 16, 64, 128)
SWIZZLES = (0, 32, 64, 128)


@gluon.jit
def shifted_a_product(a_ptr, b_ptr, c_ptr, M, SHIFT: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
                      N: gl.constexpr, SW: gl.constexpr):
    """c = a[SHIFT:SHIFT + BM] @ b, with a's rows [0, BM + 8) loaded once and the MMA reading a view."""
    a_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=SW, element_bitwidth=16, rank=2)
    b_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    a_desc = tma.make_tensor_descriptor(a_ptr, [M, BK], [BK, 1], [BM, BK], a_layout)
    halo_desc = tma.make_tensor_descriptor(a_ptr, [M, BK], [BK, 1], [8, BK], a_layout)
    b_desc = tma.make_tensor_descriptor(b_ptr, [BK, N], [N, 1], [BK, N], b_layout)
    a_smem = gl.allocate_shared_memory(gl.float16, [2 * BM, BK], a_layout)
    b_smem = gl.allocate_shared_memory(gl.float16, [BK, N], b_layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    mbarrier.expect(bar, (BM + 8) * BK * 2 + BK * N * 2)
    tma.async_copy_global_to_shared(a_desc, [0, 0], bar, a_smem.slice(0, BM))
    tma.async_copy_global_to_shared(halo_desc, [BM, 0], bar, a_smem.slice(BM, 8))
    tma.async_copy_global_to_shared(b_desc, [0, 0], bar, b_smem)
    mbarrier.wait(bar, 0)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 16])
    acc = warpgroup_mma(a_smem.slice(SHIFT, BM), b_smem, gl.zeros([BM, N], gl.float32, acc_layout))
    rows = gl.arange(0, BM, layout=gl.SliceLayout(1, acc_layout))
    cols = gl.arange(0, N, layout=gl.SliceLayout(0, acc_layout))
    gl.store(c_ptr + rows[:, None] * N + cols[None, :], acc)


def compile_only(shift: int, swizzle: int, bm=128, bk=64, n=64) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    signature = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "M": "i32", "SHIFT": "constexpr",
                 "BM": "constexpr", "BK": "constexpr", "N": "constexpr", "SW": "constexpr"}
    source = GluonASTSource(shifted_a_product, signature,
                            constexprs={"SHIFT": shift, "BM": bm, "BK": bk, "N": n, "SW": swizzle})
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    return "compiles"


def run(shift: int, swizzle: int, bm=128, bk=64, n=64) -> str:
    import torch

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    a = torch.randn(4 * bm, bk, device="cuda", dtype=torch.float16)
    b = torch.randn(bk, n, device="cuda", dtype=torch.float16)
    c = torch.zeros(bm, n, device="cuda", dtype=torch.float32)
    shifted_a_product[(1,)](a, b, c, a.shape[0], SHIFT=shift, BM=bm, BK=bk, N=n, SW=swizzle, num_warps=4)
    return f"max difference {float((c - a[shift:shift + bm].float() @ b.float()).abs().max()):.3g}"


def with_diagnostics(check, *args) -> str:
    """`check`'s result, or the compiler's first error line (MLIR writes them to the process's stderr)."""
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            return check(*args)
        except Exception as error:
            os.dup2(saved, 2)
            captured.seek(0)
            lines = [line for line in captured.read().decode(errors="replace").splitlines() if "error:" in line]
            return "refused: " + (lines[0].split("error:", 1)[1].strip()[:100] if lines else str(error)[:100])
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def main() -> int:
    check = run if sys.argv[1:] == ["run"] else compile_only
    print(f"Triton {triton.__version__}, {'run on the GPU' if check is run else 'sm90, compile only'}")
    for swizzle in SWIZZLES:
        for shift in SHIFTS:
            result = with_diagnostics(check, shift, swizzle)
            print(f"swizzle {swizzle:3d} B, view from row {shift:3d}: {result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
