"""The worker daemon as the system guide starts it: `python echoshot_ai_server/main.py` (systemd's ExecStart)."""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the package from the checkout
    from echoshot_ai_server.cli import main

    sys.exit(main(["worker"]))
