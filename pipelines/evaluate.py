"""DVC stage ``evaluate@TASK``: one column of the accuracy matrix. ``python -m pipelines.evaluate TASK``"""

from pipelines._stage import exit_now, run_stage

if __name__ == "__main__":
    exit_now(run_stage("evaluate", "pipelines.steps:evaluate_step"))
