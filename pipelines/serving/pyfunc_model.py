"""MLflow models-from-code entry point of the registered attributor (see pipelines/serving/pyfunc.py).

Inside ``mlflow models serve`` this also keeps Python tracebacks out of responses: MLflow's scoring server puts
one (with server paths) in the 400 it answers to a body it cannot parse (CSV, parquet) before the model is called,
which the model's own error handling cannot reach. Its error helper already has an off switch; we use it there.
Its ``invocations`` is wrapped so that no refusal echoes the request body and unknown request params are refused
(:mod:`pipelines.serving.guard`).
"""

import sys

from mlflow.models import set_model

from pipelines.serving.pyfunc import LoraxAttributor


def _no_tracebacks_in_responses() -> None:
    server = sys.modules.get("mlflow.pyfunc.scoring_server")  # only loaded where a scoring server runs
    handler = getattr(server, "_handle_serving_error", None)
    if handler is None or getattr(handler, "_lorax_no_trace", False):
        return

    def handle(error_message, error_code, include_traceback=True):  # noqa: ANN001 - MLflow's signature
        return handler(error_message, error_code, include_traceback=False)

    handle._lorax_no_trace = True
    server._handle_serving_error = handle


def _no_request_echo() -> None:
    """Refusals in one line without the request body; request params checked (pipelines/serving/guard.py)."""
    from pipelines.serving.guard import guarded

    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    invocations = getattr(server, "invocations", None)
    if invocations is None or getattr(invocations, "_lorax_guarded", False):
        return
    server.invocations = guarded(invocations)


_no_tracebacks_in_responses()
_no_request_echo()
set_model(LoraxAttributor())
