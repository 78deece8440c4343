"""Training throughput: plain Trainer (SGD) vs ESAMTrainer as SAM and ESAM, in one run.

    python benchmarks/throughput.py [--steps 30 --repeats 3 --methods sgd,sam,esam]   # same as `esam-hf bench`

See esam_hf/benchmark.py for what is measured; results go to benchmarks/results/.
"""

import sys

from esam_hf.benchmark import main

if __name__ == "__main__":
    main(sys.argv[1:])
