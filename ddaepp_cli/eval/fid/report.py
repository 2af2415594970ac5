"""Where `ddaepp fid` results go: the evaluation record next to the run, the table on stdout (as every
results table), warnings and paths on stderr."""

from __future__ import annotations

from pathlib import Path

from .sources import FolderSource, ImageSource

NAMES = {"fid": "FID", "sfid": "sFID", "is_mean": "IS", "is_std": "IS std", "kid_mean": "KID", "kid_std": "KID std",
         "precision": "precision", "recall": "recall", "f_score": "F-score"}


def versions() -> dict:
    import scipy
    import torch_fidelity

    from ..evalrecord import versions as base

    return {**base(), "torch_fidelity": torch_fidelity.__version__, "scipy": scipy.__version__}


def write_record(result: dict, ckpt: Path | None, source: ImageSource) -> str | None:
    """eval/fid-<timestamp>.json next to the evaluated run: the run itself, or the run that wrote a
    `ddaepp sample` folder (its protocol.json names the checkpoint)."""
    from ..evalrecord import new_record_path, save_record

    if ckpt is None and isinstance(source, FolderSource) and source.sample_protocol:
        c = source.sample_protocol.get("checkpoint")
        if c and Path(c).is_dir():
            ckpt = Path(c)
    if ckpt is None:
        return None
    saved = save_record(new_record_path(ckpt, "fid"), result)
    return str(saved) if saved else None


def print_fid(result: dict) -> None:
    """Rich table (stdout): one row per metric — or per checkpoint, with the best marked — then
    warnings and where the records went."""
    from rich.table import Table

    from ...console import err, out

    if "checkpoints" in result:
        rows = result["checkpoints"]
        keys = [k for k in dict.fromkeys(k for r in rows for k in r["metrics"]) if not k.endswith(("_std", "f_score"))]
        best = (result.get("best") or {}).get("checkpoint")
        table = Table("step", *[NAMES.get(k, k) for k in keys], "",
                      title=f"{result['run']} ({result['n']} images per checkpoint) vs {result['reference_text']}")
        for r in rows:
            ck = r["protocol"]["checkpoint"]
            table.add_row(str(r["protocol"].get("step") if r["protocol"].get("step") is not None else Path(ck).name),
                          *[f"{r['metrics'][k]:.5g}" if k in r["metrics"] else "" for k in keys],
                          "best" if ck == best else "")
        out.print(table)
        warnings = list(dict.fromkeys(w for r in rows for w in r["warnings"]))
        records = [r["eval_record"] for r in rows if r.get("eval_record")]
    else:
        ref = result["protocol"]["reference"]
        table = Table("metric", "value", title=f"{result['input'].get('path') or result['protocol'].get('checkpoint')}"
                                               f" ({result['n']} images) vs {ref}")
        for k, v in result["metrics"].items():
            table.add_row(NAMES.get(k, k), f"{v:.6g}")
        out.print(table)
        warnings = result["warnings"]
        records = [result["eval_record"]] if result.get("eval_record") else []
        if result.get("stats_file"):
            err.print(f"statistics: {result['stats_file']}", markup=False)
    for w in warnings:
        err.print(f"warning: {w}", markup=False)
    for rec in records:
        err.print(f"record: {rec}", markup=False)
