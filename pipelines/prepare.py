"""DVC stage ``prepare@TASK``: manifest + quarantine report of one task. ``python -m pipelines.prepare TASK``"""

from pipelines._stage import exit_now, run_stage

if __name__ == "__main__":
    exit_now(run_stage("prepare", "pipelines.steps:prepare_step"))
