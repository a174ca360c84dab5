"""qk_norm_rope against its peers on one GPU (Qwen3-8B shapes): ``python benchmarks/bench_rope.py --out DIR``.

The same program as ``python -m qknorm bench rope``; the code lives in ``qknorm/rope/bench.py``.
"""

import sys

from qknorm.rope.bench import main

if __name__ == "__main__":
    sys.exit(main())
