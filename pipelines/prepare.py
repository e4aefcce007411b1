"""DVC stage ``prepare@TASK``: manifest + quarantine report of one task. ``python -m pipelines.prepare TASK``"""

import sys

from lorax import ops
from pipelines._stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("prepare", ops.prepare_step))
