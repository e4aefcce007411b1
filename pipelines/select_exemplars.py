"""DVC stage ``select@TASK``: exemplar memory after the task. ``python -m pipelines.select_exemplars TASK``

(Not ``pipelines/select.py``: run as a script that name would shadow the standard library's ``select``.)
"""

import sys

from lorax import ops
from pipelines._stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("select", ops.select_step))
