"""DVC stage ``register@TASK``: a registered model version, gated ``champion`` alias. ``python -m pipelines.register TASK``"""

import sys

from lorax import ops
from pipelines._stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("register", ops.register_step, tracking=True))
