"""Run under `torchrun --nproc_per_node 2`: a `ddaepp` command that returned normally leaves no process group
behind (failures.close_launch), so the interpreter's exit tears down no live gloo threads.

Writes {"rank", "code", "initialized"} to OUT/rank-<rank>.json.

Usage: close_at_exit.py OUT ARGS...
"""

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    out, args = Path(sys.argv[1]), sys.argv[2:]
    from ddaepp_cli.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    import torch.distributed as td

    rank = int(os.environ["RANK"])
    (out / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "code": code,
                                                       "initialized": td.is_initialized()}))
