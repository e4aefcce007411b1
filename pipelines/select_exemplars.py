"""DVC stage ``select@TASK``: exemplar memory after the task. ``python -m pipelines.select_exemplars TASK``

(Not ``pipelines/select.py``: run as a script that name would shadow the standard library's ``select``.)
"""

from pipelines._stage import exit_now, run_stage

if __name__ == "__main__":
    exit_now(run_stage("select", "pipelines.steps:select_step"))
