"""Run under `torchrun`: `python -m ddaepp_cli ARGS` as a child of this rank's worker, recording how it ended.

torchrun reports one exit code for the whole launch and stops the remaining workers once one has exited,
so a test cannot see from outside how each rank ended. This wrapper runs the command in a child process
(same environment: it joins the launch as this rank), writes the child's stderr to OUT/stderr-<rank>.txt
and {"rank", "code", "end"} (exit code, -N for a signal; wall-clock end) to OUT/exit-<rank>.json, and exits
with the child's code. The launcher's SIGTERM to the worker's process group reaches the child as it would
reach a worker; the wrapper itself outlives it to record the child's end.

Usage: rank_exit.py OUT ARGS...
"""

import json
import os
import signal
import subprocess
import sys
import time


def main(out: str, *args: str) -> int:
    rank = os.environ.get("RANK", "0")
    signal.signal(signal.SIGTERM, lambda *a: None)  # a handler, not SIG_IGN: the child starts with the default
    with open(os.path.join(out, f"stderr-{rank}.txt"), "w") as err:
        child = subprocess.Popen([sys.executable, "-m", "ddaepp_cli", *args], stdout=subprocess.DEVNULL, stderr=err)
        code = child.wait()
    with open(os.path.join(out, f"exit-{rank}.json"), "w") as f:
        json.dump({"rank": int(rank), "code": code, "end": time.time()}, f)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
