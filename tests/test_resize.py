"""The GPU's x2 path: the model's output made levels and resized by half in one Triton kernel
(engine/resize.py), checked in Triton's interpreter against torch's operations, which the CPU runs
and which match OpenCV's Lanczos-4 within one level (tests/test_upscaler.py)."""

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys, torch, triton, triton.language as tl
sys.path[:0] = [{repo!r}]
from echoshot_ai_server.engine.resize import half_levels, half_levels_in_kernel, round_half_even

@triton.jit
def rounded(x_ptr, y_ptr, N: tl.constexpr):
    at = tl.arange(0, N)
    tl.store(y_ptr + at, round_half_even(tl.load(x_ptr + at)))

ties = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 254.5, 1022.5, 3.4999, 3.5001, 7.0, -7.25, 100.75, 0.0,
                     0.5 - 2 ** -25, 1023.5 - 2 ** -14], dtype=torch.float32)  # the last two: just below a half
out = torch.empty_like(ties)
rounded[(1,)](ties, out, N=16)
assert torch.equal(out, torch.round(ties)), (out, torch.round(ties))

torch.manual_seed(0)
for n, h, w, max_value, layout in [(2, 12, 20, 255, torch.channels_last), (1, 8, 14, 1023, torch.contiguous_format)]:
    # beyond [0, 1] too: the model's output is clamped before it becomes levels
    images = (torch.rand(n, 3, h, w) * 1.2 - 0.1).to(torch.float16).contiguous(memory_format=layout)
    expected = half_levels(images, max_value)  # torch's operations (the CPU's path)
    ours = half_levels_in_kernel(images, max_value)
    assert ours.shape == (n, 3, h // 2, w // 2) and ours.dtype == torch.float32
    assert torch.equal(ours, expected), (ours - expected).abs().max()
    assert ours.min() >= 0 and ours.max() <= max_value and torch.equal(ours, ours.round())
print("ok")
"""


def test_the_fused_half_resize_equals_torchs_operations():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", CHECK.format(repo=str(REPO_ROOT))], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
