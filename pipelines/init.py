"""DVC stage ``init``: start the stream (MLflow parent run, empty memory). ``python -m pipelines.init``"""

from lorax import ops
from pipelines._stage import exit_now, run_stage

if __name__ == "__main__":
    exit_now(run_stage("init", ops.init_step, task=False, tracking=True))
