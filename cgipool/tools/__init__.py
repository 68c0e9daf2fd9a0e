"""The command-line tools behind ``cgipool <command>`` (see :mod:`cgipool.cli`).

Each tool has a core that runs on a reactor and returns results (for tests and
for other code) and a thin ``run_*`` function that prints and returns an exit
status for the command line.
"""
