"""DVC stage ``synth@TASK``: synthesise a built-in zoo task (or check a folder task). ``python -m pipelines.synth TASK``"""

import sys

from lorax import ops
from pipelines._stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("synth", ops.synth_step))
