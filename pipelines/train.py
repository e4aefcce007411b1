"""DVC stage ``train@TASK``: train one task on its predecessor's state. ``python -m pipelines.train TASK``"""

from pipelines._stage import exit_now, run_stage

if __name__ == "__main__":
    exit_now(run_stage("train", "pipelines.steps:train_step", tracking=True))
