"""DVC stage ``detect`` (``pipelines/detection/dvc.yaml``): train the real/fake detector on ``detect.train_tasks``,
evaluate it on the project's other manifests, log one MLflow run. ``python -m pipelines.detect``"""

from pipelines._stage import exit_now, run_stage

if __name__ == "__main__":
    exit_now(run_stage("detect", "pipelines.detect_runs:detect_step", task=False, tracking=True))
