"""Sweeps: expand a grid file into runs, run them, then write results.csv, results.md and plots.

The command line of `python -m byzddp.sweep GRID.yaml [dotted.key=value ...] [options]`
(the grid language: byzddp/sweep/grid.py). Exit status: 0 when every run finished, 1 when a run failed (the others still ran and the
report is written), 2 for a bad grid file or option (one line naming the key), 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from byzddp.errors import ConfigError
from byzddp.sweep.grid import load_grid
from byzddp.sweep.report import write_report
from byzddp.sweep.runner import run_sweep, status, write_run_list


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m byzddp.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("grid", help="grid file (YAML), e.g. configs/sweeps/smoke.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for every run, e.g. data.dataset=mnist")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time on this machine")
    parser.add_argument("--nproc", type=int, default=None, help="run each under torchrun with N processes")
    parser.add_argument("--out", default=None, help="output folder (default runs/sweeps/<name>)")
    parser.add_argument("--name", default=None, help="sweep name (default: the grid's name)")
    parser.add_argument("--wandb", choices=("off", "offline", "online"), default=None,
                        help="log every run to W&B (default: as the config says)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--list-only", action="store_true", help="write runs.txt and list the runs")
    mode.add_argument("--slurm", action="store_true", help="write runs.txt and print the sbatch command")
    mode.add_argument("--report-only", action="store_true", help="rebuild results and plots only")
    args = parser.parse_intermixed_args(argv)   # options and overrides in any order
    try:
        if args.nproc is not None and args.nproc < 1:
            raise ConfigError(f"--nproc {args.nproc}: give at least 1 process")
        sweep = load_grid(args.grid, args.overrides, args.name, args.out)
        if sweep.notes:
            more = f" (and {len(sweep.notes) - 1} more)" if len(sweep.notes) > 1 else ""
            print(f"note: {sweep.notes[0]}{more}", file=sys.stderr)
        done = sum(status(sweep, r) == "done" for r in sweep.runs)
        print(f"sweep {sweep.name}: {len(sweep.runs)} runs ({done} finished) in {sweep.out}",
              file=sys.stderr)
        if args.list_only or args.slurm:
            path, count = write_run_list(sweep, args.wandb)
            if args.list_only:
                for r in sweep.runs:
                    print(f"{status(sweep, r):8s} {r.id}")
            print(f"wrote {path} ({count} unfinished runs)", file=sys.stderr)
            if count:
                limit = f"%{args.jobs}" if args.jobs > 1 else ""
                print(f"sbatch --array=0-{count - 1}{limit} slurm/array.sbatch {path.resolve()}")
            return 0
        failed: List[str] = []
        if not args.report_only:
            failed = run_sweep(sweep, args.jobs, args.nproc, args.wandb)
        report = write_report(sweep)
        print(f"wrote {report['csv']}, {report['markdown']}, {report['paired']} and "
              f"{len(report['plots'])} plot(s) "
              f"in {sweep.out / 'plots'}", file=sys.stderr)
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)}; logs in {sweep.out / 'logs'}",
                  file=sys.stderr)
            return 1
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130

