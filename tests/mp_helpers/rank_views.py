"""Run under `torchrun --nproc_per_node 2`: what the ranks read from files is decided once for the launch.

1. `--checkpoints all` on a run folder in which a training run writes a new checkpoint after rank 0 has
   listed it and before rank 1 would: every rank evaluates rank 0's list (checkpoint.select_checkpoints),
   else the ranks would run different numbers of collectives.
2. `train` where rank 1 reads a data set 30 images shorter (a latent cache rewritten between the ranks'
   reads): every rank refuses with the same line, instead of planning different numbers of steps.

Writes {"rank", "listed", "latest", "train_error"} to OUT/rank-<rank>.json.

Usage: rank_views.py RUN RECIPE OUT
"""

import json
import sys
import time
from pathlib import Path


def main(run: str, recipe: str, out: str) -> None:
    from ddaepp_cli import checkpoint
    from ddaepp_cli.distributed import Dist
    from ddaepp_cli.errors import UsageError
    from ddaepp_cli.recipe import load_recipe
    from ddaepp_cli.training import train as training

    rank = Dist().rank
    marker = Path(out) / "rank0-listed"
    if rank == 0:
        real = checkpoint._select_checkpoints

        def listing(*args):
            found = real(*args)
            (Path(run) / "checkpoints" / "step-0000030").mkdir()  # a training run saves a checkpoint now
            marker.touch()
            return found

        checkpoint._select_checkpoints = listing
    else:
        while not marker.exists():  # rank 1 looks only after that save
            time.sleep(0.05)
    listed = [p.name for p in checkpoint.select_checkpoints(run, "all")]
    latest = checkpoint.resolve_checkpoint(run).name

    if rank == 1:
        real_load = training.load_training_data

        def shorter(rec):
            ds = real_load(rec)
            n = len(ds) - 30
            ds.__class__ = type("Shorter", (type(ds),), {"__len__": lambda self: n})
            return ds

        training.load_training_data = shorter
    try:
        training.train(load_recipe(recipe), Path(out) / "train-run", max_steps=1)
        error = None
    except UsageError as e:
        error = str(e)
    with open(Path(out) / f"rank-{rank}.json", "w") as f:
        json.dump({"rank": rank, "listed": listed, "latest": latest, "train_error": error}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
    from ddaepp_cli.failures import close_launch

    close_launch()  # as the CLI does: no process group left to the interpreter's exit
