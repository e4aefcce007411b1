"""DVC stage ``report``: reports/metrics.json, DVC plots, the stream run's summary. ``python -m pipelines.report``"""

from pipelines._stage import exit_now, run_stage

if __name__ == "__main__":
    exit_now(run_stage("report", "pipelines.publish:report_step", task=False, tracking=True))
