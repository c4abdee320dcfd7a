"""Sweeps: expand a grid file into runs, run them, then write results.csv, results.md and plots.

    python -m byzddp.sweep GRID.yaml [dotted.key=value ...] [--jobs K] [--nproc N]
                           [--list-only | --slurm | --report-only] [--out DIR] [--name NAME]

- `grid`: the grid language (cases, grid, seeds, when, exclude, reference, table, plots) and
  its expansion into runs; its docstring is the format's specification;
- `runner`: run state and resume, the local pool, torchrun, the Slurm run list;
- `records`: the runs' records and the tables made of them (statistics, worst case);
- `report`: results.csv, results.md, paired.csv; `figures`: the plots;
- `spec`: the pieces of a grid file, each checked as it is read;
- `paired`: paired differences against each axis's baseline (paired.csv), and whether two
  runs share the honest workers' draws; `stats`: Student t quantiles and intervals;
- `cli`: the command line.
"""

from byzddp.sweep.cli import main
from byzddp.sweep.grid import Axis, Run, Sweep, Value, combos, load_grid, yaml_scalar
from byzddp.sweep.figures import draw_plots, read_curve, selection_total
from byzddp.sweep.records import METRICS, Record, Table, collect, format_cell, mean_std, tables
from byzddp.sweep.report import write_csv, write_markdown, write_paired, write_report
from byzddp.sweep.runner import (folder_hash, prepare, read_summary, run_sweep, status,
                                 train_args, train_command, write_run_list)

__all__ = ["Axis", "METRICS", "Record", "Run", "Sweep", "Table", "Value", "collect", "combos",
           "draw_plots", "folder_hash", "format_cell", "load_grid", "main", "mean_std",
           "prepare", "read_curve", "read_summary", "run_sweep", "selection_total", "status",
           "tables", "train_args", "train_command", "write_csv", "write_markdown",
           "write_paired", "write_report", "write_run_list", "yaml_scalar"]
