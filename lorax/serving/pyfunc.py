"""Where model versions registered before the library/orchestration split find their class.

Their MLflow models-from-code file (``pyfunc_model.py``, saved inside each version) runs
``from lorax.serving.pyfunc import LoraxAttributor``; the class now lives in :mod:`pipelines.serving.pyfunc`. This
module only re-exports it so those versions keep loading and serving. Nothing in the library imports it;
tests/test_layering.py allows this one legacy re-export and tests/pipelines/serving/test_serve.py loads a model
saved with the old file.
"""

from pipelines.serving.pyfunc import LoraxAttributor  # noqa: F401
