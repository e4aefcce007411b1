"""DVC stage ``init``: start the stream (MLflow parent run, empty memory). ``python -m pipelines.init``"""

from pipelines._stage import exit_now, run_stage

if __name__ == "__main__":
    exit_now(run_stage("init", "pipelines.steps:init_step", task=False, tracking=True))
