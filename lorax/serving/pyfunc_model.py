"""MLflow models-from-code entry point of the registered attributor (see lorax/serving/pyfunc.py)."""

from mlflow.models import set_model

from lorax.serving.pyfunc import LoraxAttributor

set_model(LoraxAttributor())
