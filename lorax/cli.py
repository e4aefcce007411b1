"""The old spelling of the command, ``python -m lorax.cli``: runs :mod:`pipelines.cli` (the ``lorax`` command).

Kept so existing scripts keep working; the command lives in the orchestration package. This file holds no code of
its own, and tests/test_layering.py allows its one reference to ``pipelines`` because it is an entry point only
(``python -m``), never imported by the library.
"""

if __name__ == "__main__":
    import runpy

    runpy.run_module("pipelines.cli", run_name="__main__", alter_sys=True)
