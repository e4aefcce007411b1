"""DVC stage ``train@TASK``: train one task on its predecessor's state. ``python -m pipelines.train TASK``"""

import sys

from lorax import ops
from pipelines._stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("train", ops.train_step, tracking=True))
