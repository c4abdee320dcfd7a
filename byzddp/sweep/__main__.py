"""`python -m byzddp.sweep`: the sweep's command line (byzddp.sweep.cli)."""
import sys

from byzddp.sweep.cli import main

sys.exit(main())
