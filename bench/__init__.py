"""The project's benchmark harness: ``python -m bench --help``.

Every server under test runs in its own subprocess on a free port of 127.0.0.1; subscribers
run in separate client processes; the figures come from the clients' receive timestamps and
from the server process's own CPU accounting (``/proc/<pid>/stat``). See ``docs/benchmarks.md``.
"""
