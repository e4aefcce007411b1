"""DVC stage ``init``: start the stream (MLflow parent run, empty memory). ``python -m pipelines.init``"""

import sys

from lorax import ops
from pipelines._stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("init", ops.init_step, task=False, tracking=True))
