"""What ``mlflow models serve`` answers before and around the model: a refused request is one line that never
echoes the body, and request params are the model's or refused.

MLflow's scoring server puts the whole request body in the 400 it answers to a body that is not JSON (a 5 MB body
comes back in the response), prefixes every refusal of the model with the request's data ("Failed to predict data
..."), and drops params it has no schema for without a word. :func:`guarded` wraps its ``invocations`` (installed by
the models-from-code entry, :mod:`pipelines.serving.pyfunc_model`, where a scoring server runs): the body is parsed
here first, unknown params are refused in one line, ``batch_size`` reaches the model, and any refusal that comes
back is cut to its own first line, without the request.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

PARAMS = ("batch_size",)  # the request params the model reads (pipelines.serving.pyfunc._batch_size)
REQUEST = threading.local()  # this request's params (MLflow drops params the model's signature does not declare)


def request_params() -> dict[str, Any] | None:
    """The current request's params, set by :func:`guarded` (None outside a served request)."""
    return getattr(REQUEST, "params", None)


def _refused(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _own_line(message: str) -> str:
    """A refusal without the request MLflow wrapped around it: the model's own line, or MLflow's first."""
    text = str(message)
    if "\nError: " in text and text.startswith("Failed to predict data"):
        text = text.rsplit("\nError: ", 1)[1]
    return (text.strip().splitlines() or ["the request was refused"])[0][:500]


def check_json(data: bytes | str) -> dict[str, Any] | None:
    """The parsed body, or a one-line refusal (raised) for a body that is not JSON or names an unknown param;
    None for a body that is not a JSON object (MLflow answers those itself, without the body)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise _refused(f"the request body is not valid JSON ({getattr(e, 'msg', type(e).__name__)}{where}); send "
                       "{\"dataframe_split\": {\"columns\": [\"image\"], \"data\": [[\"<base64>\"]]}}") from None
    if not isinstance(doc, dict):
        return None
    params = doc.get("params")
    if params is not None and not isinstance(params, dict):
        raise _refused("params: expected an object such as {\"batch_size\": 32}")
    unknown = sorted(str(k) for k in (params or {}) if k not in PARAMS)
    if unknown:
        raise _refused(f"params: unknown request param(s) {', '.join(unknown)}; this model reads: "
                       f"{', '.join(PARAMS)}")
    return doc


def guarded(invocations: Callable[..., Any]) -> Callable[..., Any]:
    """MLflow's ``invocations(data, content_type, model, input_schema)`` with the checks of the module docstring."""
    from mlflow.exceptions import MlflowException

    def invocations_guarded(data, content_type, model, input_schema):  # noqa: ANN001 - MLflow's signature
        try:
            doc = None
            if str(content_type or "").split(";")[0].strip() == "application/json":
                doc = check_json(data)
            REQUEST.params = (doc or {}).get("params")
            return invocations(data, content_type, model, input_schema)
        except MlflowException as e:
            e.message = _own_line(e.message)
            raise
        finally:
            REQUEST.params = None

    invocations_guarded._lorax_guarded = True
    return invocations_guarded
