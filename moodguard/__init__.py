"""The top layer: the ``moodguard`` command line (:mod:`moodguard.cli` and its ``cli_*`` command
modules) and the sweep orchestration (:mod:`moodguard.sweep_file`, ``sweep_plan``, ``sweep_emit``,
``sweep_run``). It sits above ``train`` and ``eval`` and may import both; nothing below imports it
(see docs/architecture.md)."""
