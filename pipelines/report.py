"""DVC stage ``report``: reports/metrics.json, DVC plots, the stream run's summary. ``python -m pipelines.report``"""

import sys

from lorax import ops
from pipelines._stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("report", ops.report_step, task=False, tracking=True))
