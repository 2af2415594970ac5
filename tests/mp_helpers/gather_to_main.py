"""Run under `torchrun --nproc_per_node 2`: `ddaepp sample` and `ddaepp fid` of a run, counting the bytes each
rank receives from other ranks through the object collectives (all_gather_object / gather_object).

Images and features must travel to rank 0 (the writer) only: rank 1 may receive small control objects,
never rank 0's share of the images or features. Writes {"rank", "sample", "fid"} (bytes) to OUT-<rank>.json.

Usage: gather_to_main.py RUN REF_FOLDER INCEPTION_WEIGHTS OUT_PREFIX
"""

import json
import os
import pickle
import sys

import torch.distributed as td

received = {"bytes": 0}
_all_gather_object, _gather_object = td.all_gather_object, td.gather_object


def _count(out) -> None:
    rank = td.get_rank()
    received["bytes"] += sum(len(pickle.dumps(o)) for i, o in enumerate(out or []) if i != rank)


def all_gather_object(object_list, obj, group=None):
    _all_gather_object(object_list, obj, group=group)
    _count(object_list)


def gather_object(obj, object_gather_list=None, dst=0, group=None):
    _gather_object(obj, object_gather_list, dst=dst, group=group)
    _count(object_gather_list)


td.all_gather_object, td.gather_object = all_gather_object, gather_object


def main(run: str, ref: str, weights: str, out: str) -> None:
    from ddaepp_cli.distributed import Dist
    from ddaepp_cli.eval.fid import fid
    from ddaepp_cli.sample import sample_command

    dist = Dist()
    seeds = list(range(8))
    sample_command(run, seeds=seeds, out=f"{out}-samples", sampler=None, steps=None, weights="ema",
                   formats=["npz"], batch_size=4, clip=None)
    got = {"sample": received["bytes"]}
    received["bytes"] = 0
    fid(run, seeds=seeds, batch_size=4, ref=ref, inception_weights=weights, cache=False, extractor_dtype="float32",
        metrics="fid,sfid,is", save_samples=f"{out}-fid-samples")
    got["fid"] = received["bytes"]
    with open(f"{out}-{dist.rank}.json", "w") as f:
        json.dump({"rank": dist.rank, **got, "pid": os.getpid()}, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
    from ddaepp_cli.failures import close_launch

    close_launch()  # as the CLI does: no process group left to the interpreter's exit
