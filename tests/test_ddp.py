"""byzddp.ddp.register: a robust DDP communication hook, on 2 and 3 gloo ranks (tests/ddp_probe.py).

Every case trains a small model for 3 steps with DDP (several buckets, DDP's re-bucketing after
the first step) and compares the gradients DDP hands back with the rule applied by hand to the
gathered per-rank gradients (forged by hand for the Byzantine ranks), and the parameters'
checksums across ranks."""
import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, env, free_port, run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def probe(tmp_path, nproc, spec):
    out, spec_file = tmp_path / "out.pt", tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    got = run_ranks(ROOT / "tests" / "ddp_probe.py", out, spec_file, nproc, timeout=300)
    return got


def check_case(result, mode, tol=1e-6):
    assert result["mode"] == mode
    assert max(result["errors"]) <= tol, result["errors"]
    sums = result["checksums"]
    assert (sums == sums[0]).all(), "ranks ended with different parameters"


def test_two_ranks_mean_is_ddp_and_rules_match_by_hand(tmp_path):
    cases = {
        "default": {"register": False, "accum": 2, "unused": True},
        "mean": {"rule": "mean", "accum": 2, "unused": True},
        "cm": {"rule": "cm"},
        # krum's guarantee needs 3 ranks; on 2 it still must run exactly and agree across ranks
        "krum": {"rule": "krum", "allow_unsafe": True, "accum": 3, "unused": True},
        # too small for a column chunk per rank: the whole rows on every rank
        "krum_small": {"rule": "krum", "allow_unsafe": True, "hidden": 16, "bucket_mb": 0.0004},
        "cclip": {"rule": "cclip", "rule_args": {"tau": 0.05}},
    }
    refusals = {
        "labelflip": {"rule": "mean", "byzantine_ranks": [1], "attack": "labelflip"},
        "krum": {"rule": "krum"},
        "arg": {"rule": "cm", "T": 3},
        "f": {"rule": "cm", "f": 1},
        "no_attack": {"byzantine_ranks": [1]},
        "monna": {"rule": "monna", "f": 0, "byzantine_ranks": [0], "attack": "bitflip", "allow_unsafe": True},
        "fltrust": {"rule": "fltrust"},
    }
    got = probe(tmp_path, 2, {"cases": cases, "refusals": refusals})
    r = got["results"]
    # rule="mean" gives DDP's own gradients (no_sync accumulation and unused parameters included)
    default, mean = r["default"]["grads"], r["mean"]["grads"]
    assert ((mean - default).norm(dim=1) <= 1e-5 * default.norm(dim=1)).all()
    assert torch.equal(r["mean"]["checksums"], r["default"]["checksums"])
    check_case(r["mean"], "bucket")
    check_case(r["cm"], "bucket")
    check_case(r["krum"], "whole")
    check_case(r["krum_small"], "gathered")
    check_case(r["cclip"], "whole", tol=1e-5)
    m = got["refusals"]
    for name, line in m.items():
        assert line.startswith("byzddp.ddp.register") and "\n" not in line, (name, line)
    assert "labelflip" in m["labelflip"] and "trains on" in m["labelflip"]
    assert "2f'+3 <= m" in m["krum"] and "allow_unsafe=True" in m["krum"]
    assert "'T'" in m["arg"]
    assert "argument f" in m["f"]
    assert "attack=" in m["no_attack"]
    assert "designated=0" in m["monna"] and "fltrust" in m["fltrust"]


def test_three_ranks_byzantine_rank_forges_in_the_hook(tmp_path):
    cases = {
        "cm_bitflip": {"rule": "cm", "f": 1, "byzantine_ranks": [2], "attack": "bitflip"},
        "cm_alie": {"rule": "cm", "f": 1, "byzantine_ranks": [1], "attack": "alie", "attack_args": {"z": 1.5},
                    "accum": 2},
        "krum_ipm": {"rule": "krum", "byzantine_ranks": [0], "f": 0, "attack": "ipm", "allow_unsafe": True,
                     "unused": True},
        "krum_gaussian": {"rule": "krum", "byzantine_ranks": [2], "f": 0, "attack": "gaussian",
                          "attack_args": {"sigma": 3.0}, "allow_unsafe": True},
        "mean_bucketing": {"rule": "mean", "f": 1, "byzantine_ranks": [2], "attack": "bitflip", "pre": "bucketing",
                           "s": 2},
        "cm_nnm": {"rule": "cm", "f": 1, "byzantine_ranks": [0], "attack": "bitflip", "pre": "nnm"},
    }
    r = probe(tmp_path, 3, {"cases": cases})["results"]
    check_case(r["cm_bitflip"], "bucket")
    check_case(r["cm_alie"], "bucket", tol=1e-5)
    check_case(r["krum_ipm"], "whole")
    check_case(r["krum_gaussian"], "whole")
    check_case(r["mean_bucketing"], "bucket")
    check_case(r["cm_nnm"], "whole", tol=1e-5)


def _example(args, nproc=2):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "examples" / "ddp_robust.py"), *args], cwd=ROOT,
                              env={**env(), "PYTHONPATH": str(ROOT), "RANK": str(r), "WORLD_SIZE": str(nproc),
                                   "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(nproc)]
    out = [p.communicate(timeout=300) for p in procs]
    return [p.returncode for p in procs], out[0][0], out[0][1]


def test_the_example_script_runs_and_refuses_in_one_line():
    codes, stdout, _ = _example(["--steps", "3"])
    assert codes == [0, 0] and "parameters identical on all 2 ranks: True" in stdout, stdout
    codes, _, stderr = _example(["--rule", "krum", "--steps", "3"])
    assert codes == [2, 2]
    line = [s for s in stderr.splitlines() if "byzddp.ddp.register" in s]
    assert len(line) == 1 and "2f'+3 <= m" in line[0] and "Traceback" not in stderr, stderr
