"""The command-line tools behind ``cgipool <command>`` (see :mod:`cgipool.cli`).

A package apart from ``cgipool`` so that the daemon (``twistd cgipool`` →
:mod:`cgipool.tap`) never imports them: load generation (``stress``), the Selenium
screenshots (``screenshot``, the ``cgipool[tools]`` extra) and the HTTP client the
tools share.  They use the daemon's package (its configuration reader, the
proxy's upstream connections), never the other way round; ``tests/test_tools_apart.py``
checks it.

Each tool has a core that runs on a reactor and returns results (for tests and
for other code) and a thin ``run_*`` function that prints and returns an exit
status for the command line.
"""
