"""DVC stage ``synth@TASK``: synthesise a built-in zoo task (or check a folder task). ``python -m pipelines.synth TASK``"""

from pipelines._stage import exit_now, run_stage

if __name__ == "__main__":
    exit_now(run_stage("synth", "pipelines.steps:synth_step"))
