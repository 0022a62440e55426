"""The cold-start benchmark; its code is gpusnap/bench/cold_start.py (`gpusnap bench` runs it small).

    python benchmarks/cold_start.py --sizes 1b,8b --runs 3 [--variants] [--sdk] --out DIR
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpusnap.bench.cold_start import main  # noqa: E402

if __name__ == "__main__":
    main()
