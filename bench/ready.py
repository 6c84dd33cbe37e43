"""A GPU worker's start-up, as the worker does it: from a fresh process to ready (GPU).

Imports, loading the served models (MODELS), warming each one up and measuring each one's speed
(app/wiring.py's warm_up_models), with the kernel cache KERNEL_CACHE_DIR as it is: run it twice to
see an empty cache and then a prepared one.

    KERNEL_CACHE_DIR=... MODELS=... [GPU_TAIL_COMPILE=background|start|never] python bench/ready.py --json PATH
"""

import time

PROCESS_STARTED = time.monotonic()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echoshot_ai_server.app.estimate import ComputeEstimator  # noqa: E402
from echoshot_ai_server.app.wiring import load_models, warm_up_models  # noqa: E402
from echoshot_ai_server.config import Settings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    report = {"imports_s": round(time.monotonic() - PROCESS_STARTED, 1)}
    settings = Settings()
    started = time.monotonic()
    models = load_models(settings, "gpu", 1)
    report["load_s"] = round(time.monotonic() - started, 1)
    speeds = {}
    estimator = ComputeEstimator(on_measured=lambda name, speed: speeds.update({name: round(speed)}))
    started = time.monotonic()
    report["warm_up_s"] = {k: round(v, 1) for k, v in warm_up_models(settings, models, estimator).items()}
    report["warm_up_and_speeds_s"] = round(time.monotonic() - started, 1)
    report["speeds_pixels_per_s"] = speeds
    report["ready_s"] = round(time.monotonic() - PROCESS_STARTED, 1)
    fused = [m.forward for m in models[0].values() if m.engine == "fused"]
    if fused and settings.gpu_tail_compile == "background":  # when the tail compiled on a thread takes over
        for thread in [t for t in threading.enumerate() if t.name == "compile-tail"]:
            thread.join()
        if all(f.tail != f._triton_tail for f in fused):  # else the compile failed (logged): eager goes on
            report["compiled_tail_from_s"] = round(time.monotonic() - PROCESS_STARTED, 1)
    report["models"] = list(models[0])
    report["engines"] = {name: upscaler.engine for name, upscaler in models[0].items()}
    print(json.dumps(report), flush=True)
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
