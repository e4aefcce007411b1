"""DVC stage ``register`` of ``pipelines/detection/dvc.yaml``: the detector as a version of ``detect.registered_model``,
gated ``champion`` alias. ``python -m pipelines.register_detector``"""

from pipelines._stage import exit_now, run_stage

if __name__ == "__main__":
    exit_now(run_stage("register_detector", "pipelines.detect_runs:register_detector_step", task=False,
                       tracking=True))
