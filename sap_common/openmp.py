"""OpenMP settings the sap-client and sap-server processes start with (set before torch is imported).

torch's CPU build runs each operator's parallel region on an OpenMP (libgomp) team. Between regions the
team's idle threads spin before they sleep: by default for about 300,000 iterations, several milliseconds
of a core after every burst of work. A split step hands the work back and forth between the user's and the
provider's process four times; when both run on the same cores (a local run, a test, the benchmarks) each
hand-over leaves one process spinning on a core the other one needs. With GOMP_SPINCOUNT=10000 the wait is
about a millisecond: on 2 cores the split's training throughput went from about 0.88 to about 0.94 of a
single process (benchmarks/README.md), while a single process trains as fast as with the default. Only a
default: a GOMP_SPINCOUNT (or OMP_WAIT_POLICY) already in the environment is kept.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "10000"


def prefer_short_spin() -> bool:
    """Set GOMP_SPINCOUNT for this process unless the user chose a spin policy; True when it was set.
    Has an effect only before torch is imported (libgomp reads its environment when it loads)."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True
