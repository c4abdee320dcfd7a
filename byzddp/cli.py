"""`train.py --config PATH [dotted.key=value ...]`: config -> process group -> trainer -> outputs."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from byzddp import config as config_mod
from byzddp.config import DEFAULT_CONFIG, ConfigError


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="train.py", description="Byzantine-robust distributed training on non-iid data.",
        epilog="Example: torchrun --nproc_per_node=4 train.py --config configs/default.yaml "
               "aggregator.name=rfa resampling.name=bucketing")
    parser.add_argument("--config", default=None,
                        help="YAML config (default: configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    # Options and overrides in any order: `train.py a=1 --config x.yaml b=2`.
    return parser.parse_intermixed_args(argv)


def _rank() -> int:
    import os
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def run(argv=None) -> int:
    args = parse_args(argv)
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    cfg = config_mod.load(path, args.overrides)
    # The model's bits depend on the intra-op thread count; the config fixes it, not the launcher.
    import torch
    torch.set_num_threads(cfg.train.threads)

    from byzddp import checkpoint, distributed
    from byzddp.logging import RunLogger, claim
    from byzddp.trainer import StopRequested, Trainer

    topo = distributed.setup(cfg)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    folder = log = None
    clean = False  # every rank got to the end of the run (finished or stopped by a signal)
    try:
        run_dir = Path(cfg.log.dir) / config_mod.run_name(cfg)
        folder = claim(cfg, run_dir, topo)    # one config per folder, one live run at a time
        trainer = Trainer(cfg, topo, run_dir)
        resumed = checkpoint.resume(trainer, run_dir, cfg.train.resume)
        log = RunLogger(cfg, run_dir, topo.is_server)
        try:
            summary = trainer.fit(log)
        except StopRequested as stop:
            log.finish(None)
            if topo.is_server:
                print(f"byzddp: {stop}; resume with train.resume=auto", file=sys.stderr, flush=True)
            clean = True
            return 128 + stop.signum
        summary["config_hash"] = config_mod.config_hash(cfg)
        summary["threads"] = torch.get_num_threads()
        summary["resumed_from"] = str(resumed) if resumed else None
        log.finish(summary)
        if topo.is_server:
            print(f"final test accuracy {summary['final_test_accuracy']:.4f} "
                  f"(mean of last 5 evaluations {summary['final_test_accuracy_last5']:.4f}); "
                  f"run files in {run_dir}", flush=True)
        clean = True
        return 0
    finally:
        if log is not None:
            log.close()         # end the progress bar's line before any error is printed
        if folder is not None:
            folder.close()
        for sig, handler in handlers.items():   # fit's stop handlers live as long as the run
            signal.signal(sig, handler)
        distributed.teardown(clean)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our warnings are sentences for the user: one line, no source location."""
    if _rank() == 0:
        print(f"byzddp: warning: {message}", file=sys.stderr, flush=True)


@record
def main(argv=None) -> int:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated")
        warnings.showwarning = _one_line_warning
        return _main(argv)


def _error(message: str, code: int, show: bool = True) -> int:
    """Print `error: <message>` (where `show`) and return `code`. Under torchrun, also put the
    line in this rank's error file: torchrun's failure report, printed after all the ranks wrote,
    then names it as the root cause instead of "To enable traceback see: ..."."""
    line = f"error: {message}"
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")   # "" when torchrun keeps no files
    if path:
        # ErrorHandler.record_exception's format less "py_callstack", which the report would show
        # in place of the message; the report picks the earliest timestamp (whole seconds).
        data = {"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}
        try:
            Path(path).write_text(json.dumps(data))
        except OSError:
            pass    # the report falls back to its generic line; ours is still printed
    if show:
        print(line, file=sys.stderr, flush=True)
    return code


def _main(argv) -> int:
    try:
        return run(argv)
    except ConfigError as e:
        # Every rank refuses the same config; rank 0 speaks for all. Under torchrun the first rank
        # to fail gets the others killed, rank 0 maybe before it spoke: another rank speaks after
        # a moment if still alive (rank 0 was slower, or the error is this rank's own); killed,
        # it leaves no error file, so the report's root cause is rank 0's line.
        later = _rank() != 0 and bool(os.environ.get("TORCHELASTIC_ERROR_FILE"))
        if later:
            time.sleep(2)
        return _error(str(e), 2, show=_rank() == 0 or later)
    except FileNotFoundError as e:
        return _error(str(e), 2)
    except KeyboardInterrupt:
        # Interrupted outside fit (set-up, data loading), where SIGINT is not a stop request.
        return _error(f"rank {_rank()}: interrupted outside training; no checkpoint was written",
                      128 + signal.SIGINT)
    except Exception as e:
        from byzddp.errors import NonFiniteError
        from byzddp.io import OutputError
        from byzddp.trainer import CollectiveError
        if isinstance(e, (OutputError, CollectiveError, NonFiniteError)):
            return _error(f"rank {_rank()}: {e}", 1)
        raise


def command_line() -> None:
    """The command line (train.py, the byzddp-train script, python -m byzddp.cli): main, then
    exit without the interpreter's teardown. Every output is written and the process group is
    left by then; skipping finalization keeps gloo's worker threads, still holding tensors, from
    aborting a run that succeeded (SIGABRT while Python tears down, timing-dependent and rare)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if code is None else int(code))   # None: --help, as sys.exit(None)


if __name__ == "__main__":
    command_line()
