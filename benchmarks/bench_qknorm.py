#!/usr/bin/env python3
"""Benchmark qknorm against its peers on one GPU: ``python benchmarks/bench_qknorm.py --help``.

The same as ``python -m qknorm bench``; the measuring code is :mod:`qknorm.bench`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

try:
    from qknorm.bench import main
except ImportError:  # run from a checkout without installing: the repository root holds qknorm/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from qknorm.bench import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
