"""Performance benchmarks (not tests): ``python -m benchmarks.superfeature``, ``python -m benchmarks.task_cost``.

Results, with machine, date, command and load, are kept in ``benchmarks/RESULTS.md``.
"""
