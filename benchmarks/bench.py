"""ddaepp benchmark: ratios measured in one run — machines are noisy, ratios are not.

    python benchmarks/bench.py                 # paper-size networks (≈ 10 min on a 2-core CPU, --budget 720)
    python benchmarks/bench.py --quick         # tiny networks, few repetitions (well under a minute)
    python benchmarks/bench.py --only a,b      # some groups only (a b c d e f)

Groups (one module each; variants of a group are timed round-robin, medians):
  a  training step per backbone (ddpm, ddpmpp, UViT-S on 32×32×3; DiT-B/1 on 16×16×32 latents; DiT-L/1
     with --with-dit-l): our default step vs the naive reference layout (target naive ÷ ours ≥ 1),
     channels-last, feature taps, torch.compile (child process, compile time excluded but reported;
     given what is left of the time budget)                                         group_train.py
  b  self-conditioning: parameters (≤ 1.5 %) and step time (≤ 3 %)                 group_train.py
  c  contrastive self-distillation and SRA vs the plain diffusion step (SRA ≤ +20 %) group_losses.py
  d  probe grid L×K in one pass vs a single probe (≤ 1.5× per time); CKA feature vs Gram form
                                                                                     group_probe.py
  e  sampler images/s (DDIM / Heun / Euler on ddpmpp); FID Inception features images/s
                                                                                     group_sampling.py
  f  data loading images/s (CIFAR pickles, latent shards) ÷ training images/s (≫ 1)  group_data.py

One rich table on stdout; JSON (every row with its target and whether it is met, the machine) in
benchmarks/results/bench-<cpu|gpu>-<UTC stamp>.json. `--budget` bounds the wall time: groups stop
adding repetitions when their share is spent (never below 3 rounds), and torch.compile gets what is
left (a cold inductor compile takes minutes on a small CPU; its row then says n/a and why).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from report import GROUP_TITLES, Row, machine, print_table, write_json  # noqa: E402

GROUPS = tuple(GROUP_TITLES)
# Share of --budget for the timed rounds of one interleaved measurement, per group.
SHARES = {"a": 0.1, "c": 0.05, "e": 0.025}  # a: more rounds, its ratios are the acceptance checks


@dataclass
class Context:
    device: torch.device
    quick: bool
    batch: int
    reps: int
    warmup: int
    sample_batch: int
    fid_batch: int
    with_dit_l: bool
    no_compile: bool
    compile_reps: int
    budget_s: float
    reserve_s: float = 15.0
    start: float = field(default_factory=time.perf_counter)
    train_rate: dict = field(default_factory=dict)  # backbone → training images/s (group a, "ours")
    step_seconds: dict = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def time_left(self) -> float:
        return self.budget_s - self.elapsed()

    def group_budget(self, group: str) -> float | None:
        return None if self.quick else SHARES.get(group, 0.05) * self.budget_s

    def min_reps(self) -> int:
        """Timed rounds a measurement always gets: 3, or 2 once most of the budget is spent."""
        return 3 if self.time_left() > 0.35 * self.budget_s else 2

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {msg}", file=sys.stderr, flush=True)


def parse_groups(values: list[str] | None) -> list[str]:
    if not values:
        return list(GROUPS)
    out = []
    for v in values:
        for g in v.replace(" ", "").lower().split(","):
            if g not in GROUPS:
                raise SystemExit(f"bench.py: unknown group {g!r}; valid: {', '.join(GROUPS)}")
            if g not in out:
                out.append(g)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny networks, few repetitions (smoke test, < 1 min)")
    ap.add_argument("--only", action="append", metavar="GROUP", help="run only these groups (a-f; repeat or a,b)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: CPU 1, GPU 16; "
                    "contrastive steps use at least 2)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds per measurement, at most (default 9, quick 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--budget", type=float, default=720.0, help="wall-time budget in seconds (default 720)")
    ap.add_argument("--with-dit-l", action="store_true", help="also DiT-L/1 (on by default on a GPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    groups = parse_groups(args.only)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    default_batch = 2 if args.quick else (16 if gpu else 1)
    ctx = Context(device=device, quick=args.quick, batch=args.batch or default_batch,
                  reps=args.reps or (2 if args.quick else 9), warmup=args.warmup,
                  sample_batch=2 if args.quick else (64 if gpu else 2),
                  fid_batch=1 if args.quick else (64 if gpu else 4),
                  with_dit_l=args.with_dit_l or (gpu and not args.quick), no_compile=args.no_compile or args.quick,
                  compile_reps=2 if args.quick else 3, budget_s=args.budget)
    ctx.log(f"ddaepp bench on {device.type} ({machine().get('gpu') or machine()['cpu']}), groups {','.join(groups)}"
            f"{', quick' if args.quick else ''}, batch {ctx.batch}, budget {args.budget:.0f} s")
    rows: list[Row] = []
    errors: dict[str, str] = {}

    def guarded(name: str, fn):
        if name != "f" and ctx.time_left() < ctx.reserve_s + 30:  # keep the budget: report instead of run
            for g in name.split("/"):
                rows.append(Row(g, name, "group not run", None, status="skipped",
                                note=f"time budget ({args.budget:.0f} s) spent; run it alone with --only {g}"))
            return
        try:
            rows.extend(fn())
        except Exception as e:  # noqa: BLE001 — one failing group must not lose the others' results
            import traceback

            traceback.print_exc()
            errors[name] = " ".join(f"{type(e).__name__}: {e}".split())[:500]
            for g in name.split("/"):
                rows.append(Row(g, name, "group failed", None, status="error", note=errors[name][:160]))

    if "a" in groups or "b" in groups:
        import group_train

        guarded("/".join(g for g in ("a", "b") if g in groups),
                lambda: group_train.run(ctx, {g for g in ("a", "b") if g in groups}))
    if "c" in groups:
        import group_losses

        guarded("c", lambda: group_losses.run(ctx))
    if "d" in groups:
        import group_probe

        guarded("d", lambda: group_probe.run(ctx))
    if "e" in groups:
        import group_sampling

        guarded("e", lambda: group_sampling.run(ctx))
    if "f" in groups:
        import group_data

        guarded("f", lambda: group_data.run(ctx))
    if "a" in groups:
        import group_train

        guarded("a", lambda: group_train.compile_rows(ctx))

    order = {k: i for i, k in enumerate(("ddpm", "ddpmpp", "uvit", "dit-B/1", "dit-L/1"))}
    rows.sort(key=lambda r: (r.group, order.get(r.subject, 99)))  # stable: measurement order within a subject
    wall = ctx.elapsed()
    with_target = [r for r in rows if r.target is not None and r.met is not None]
    results = {
        "machine": machine(), "device": device.type, "quick": args.quick, "groups_run": groups,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "batch": ctx.batch, "reps": ctx.reps, "warmup": ctx.warmup, "budget_s": args.budget, "wall_s": wall,
        "summary": {"rows": len(rows), "with_target": len(with_target), "met": sum(bool(r.met) for r in with_target),
                    "not_met": [f"{r.group} {r.subject}: {r.metric}" for r in with_target if not r.met]},
        "errors": errors,
        "groups": {g: [r.to_json() for r in rows if r.group == g] for g in groups},
        "train_img_per_s": ctx.train_rate,
    }
    title = (f"ddaepp benchmark ({device.type}, batch {ctx.batch}{', quick' if args.quick else ''}; "
             f"{wall:.0f} s) — ratios of variants timed round-robin in this run, medians")
    print_table(rows, title)
    s = results["summary"]
    not_met = f"; not met: {'; '.join(s['not_met'])}" if s["not_met"] else ""
    print(f"targets met: {s['met']}/{s['with_target']}{not_met}")
    results["json"] = str(write_json(results, args.out, device))
    return results


if __name__ == "__main__":
    res = main()
    sys.exit(1 if res["errors"] else 0)
