"""``torchrun --nproc_per_node N -m framework.train --config F.yaml [--set key=value ...]``."""

import sys

from framework.train.launch import main

if __name__ == "__main__":
    sys.exit(main())
