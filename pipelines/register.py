"""DVC stage ``register@TASK``: a registered model version, gated ``champion`` alias. ``python -m pipelines.register TASK``"""

from lorax import ops
from pipelines._stage import exit_now, run_stage

if __name__ == "__main__":
    exit_now(run_stage("register", ops.register_step, tracking=True))
