"""DVC stage ``prepare@TASK``: manifest + quarantine report of one task. ``python -m pipelines.prepare TASK``"""

from lorax import ops
from pipelines._stage import exit_now, run_stage

if __name__ == "__main__":
    exit_now(run_stage("prepare", ops.prepare_step))
