"""Benchmark result rows, the machine description, the one rich table and the results JSON."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

GROUP_TITLES = {
    "a": "training step",
    "b": "self-conditioning",
    "c": "auxiliary losses",
    "d": "probe / CKA",
    "e": "sampling / FID",
    "f": "data loading",
}


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    d = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
         "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
         "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cuda": torch.cuda.is_available()}
    try:
        d["load_average"] = os.getloadavg()  # a hint of how contended the machine was at the start
    except OSError:
        pass
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
        d["cuda_version"] = torch.version.cuda
    return d


@dataclass
class Row:
    """One line of the table. `value` is a ratio (unit "×"), a rate or a percentage; `target` is
    (op, threshold) with op "<=" or ">=" on `value`, or None for an informational row."""

    group: str
    subject: str  # backbone, sampler, loader, …
    metric: str  # what the value is, e.g. "naive ÷ ours (step time)"
    value: float | None
    unit: str = "×"
    target: tuple[str, float] | None = None
    status: str = "ok"  # ok | n/a | skipped | error
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    noise: float | None = None  # half the inter-quartile range of the per-round ratios

    @property
    def conclusive(self) -> bool | None:
        """False when the target lies within the measurement noise of the value."""
        if self.met is None:
            return None
        return self.noise is None or abs(self.value - self.target[1]) > self.noise

    @property
    def met(self) -> bool | None:
        if self.target is None or self.status != "ok" or self.value is None or not math.isfinite(self.value):
            return None
        op, thr = self.target
        return self.value <= thr if op == "<=" else self.value >= thr

    def target_text(self) -> str:
        if self.target is None:
            return "—"
        op, thr = self.target
        sym = "≤" if op == "<=" else "≥"
        return f"{sym} {fmt(thr, self.unit)}"

    def to_json(self) -> dict:
        d = asdict(self)
        d["target"] = None if self.target is None else {"op": self.target[0], "value": self.target[1],
                                                        "text": self.target_text()}
        d["met"] = self.met
        d["conclusive"] = self.conclusive
        if d["value"] is not None and not math.isfinite(d["value"]):
            d["value"] = None
        return d


def fmt(v: float | None, unit: str) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    if unit == "×":
        return f"{v:.3f}×" if abs(v - 1) < 0.1 else f"{v:.2f}×"
    if unit == "%":
        return f"{v:.2f} %"
    if unit == "s":
        return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"
    return f"{v:.3g} {unit}" if v < 100 else f"{v:,.0f} {unit}"


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col, kw in (("grp", {}), ("subject", {}), ("measure", {}), ("value", {"justify": "right"}),
                    ("±", {"justify": "right"}), ("target", {}), ("met", {"justify": "center"}),
                    ("notes", {"overflow": "fold"})):
        table.add_column(col, **kw)
    last = None
    for r in rows:
        if last is not None and r.group != last:
            table.add_section()
        last = r.group
        met = {True: "[green]yes[/]", False: "[red]NO[/]", None: ""}[r.met]
        if r.conclusive is False:  # the target is within the noise: say so
            met = {True: "[yellow]yes~[/]", False: "[yellow]no~[/]"}[r.met]
        value = fmt(r.value, r.unit) if r.status == "ok" else r.status
        noise = f"{r.noise:.3f}" if r.noise is not None and r.status == "ok" else ""
        table.add_row(r.group, r.subject, r.metric, value, noise, r.target_text(), met, r.note)
    Console(width=max(170, Console().width)).print(table)
    print("value: median of per-round ratios (variants interleaved round-robin); ±: half the inter-quartile "
          "range of those ratios; 'yes~'/'no~': the target lies within ± of the value (inconclusive here)")


def write_json(results: dict, out_dir: Path, device: torch.device) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"bench-{'gpu' if device.type == 'cuda' else 'cpu'}-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)
    return path
