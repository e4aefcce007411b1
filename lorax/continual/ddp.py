"""The old spelling of the torchrun entry point, ``torchrun ... -m lorax.continual.ddp``: runs :mod:`pipelines.ddp`.

Kept so existing cluster scripts keep working. The library's distributed pieces are
:mod:`lorax.continual.distributed`; this file holds no code of its own, and the layering test allows its one
reference to ``pipelines`` because it is an entry point only (``python -m``), never imported by the library.
"""

if __name__ == "__main__":
    import runpy

    runpy.run_module("pipelines.ddp", run_name="__main__", alter_sys=True)
