"""The x2 output's resize on the GPU: the model's output made levels and halved with torch's
operations (`lanczos_half` on the levels) against the one kernel (`half_levels`), on a batch of 4
frames of 1280x720 → x4 (5120x2880, channels-last fp16, as the model leaves it): ms each and the
largest difference of the levels.

    python bench/half_resize.py [--size 1280x720] --json PATH
"""

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from echoshot_ai_server.engine.resize import half_levels, lanczos_half, levels  # noqa: E402
from model_variants import timed  # noqa: E402  (GPU seconds of a run among 20 queued back to back)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    torch.manual_seed(0)
    output = (torch.rand(4, 3, 4 * h, 4 * w, device="cuda") * 1.1 - 0.05).half()
    output = output.contiguous(memory_format=torch.channels_last)

    def operations():
        return lanczos_half(levels(output, 255)).round_().clamp_(0, 255)

    difference = (operations() - half_levels(output, 255)).abs()
    report = {"card": torch.cuda.get_device_name(0), "size": args.size,
              "operations_ms": round(timed(operations, 20) * 1e3, 3),
              "kernel_ms": round(timed(lambda: half_levels(output, 255), 20) * 1e3, 3),
              "max_diff": float(difference.max()), "share_equal": float((difference == 0).float().mean())}
    print(json.dumps(report))
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
