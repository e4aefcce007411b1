"""DVC stage ``evaluate@TASK``: one column of the accuracy matrix. ``python -m pipelines.evaluate TASK``"""

import sys

from lorax import ops
from pipelines._stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("evaluate", ops.evaluate_step, tracking=True))
