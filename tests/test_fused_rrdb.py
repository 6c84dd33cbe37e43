"""The experimental fused RRDB trunk (bench/fused_rrdb.py) computes RRDBNet, checked in Triton's interpreter."""

import os
import subprocess
import sys

from conftest import REPO_ROOT

CHECK = """
import sys, torch
sys.path[:0] = [{repo!r}, {bench!r}]
from echoshot_ai_server.upscaler import ModelSpec, build_model
from fused_rrdb import FusedRRDBNet
torch.manual_seed(0)
model = build_model(ModelSpec(num_feat=64, num_block=2, num_grow_ch=32)).eval()
for module in model.modules():
    if isinstance(module, torch.nn.Conv2d):
        module.reset_parameters()
x = torch.rand(2, 3, 9, 11)
with torch.no_grad():
    expected, got = model(x), FusedRRDBNet(model, dtype=torch.float32)(x)
error = ((got - expected).norm() / expected.norm()).item()
print(error)
assert got.shape == expected.shape and error < 1e-4, error
"""


def test_fused_trunk_equals_rrdbnet():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = CHECK.format(repo=str(REPO_ROOT), bench=str(REPO_ROOT / "bench"))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
