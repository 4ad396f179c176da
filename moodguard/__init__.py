"""The top layer: the ``moodguard`` command line (:mod:`moodguard.cli` and its ``cli_*`` command
modules) and the sweep orchestration (:mod:`moodguard.sweep`). It sits above ``train`` and
``eval`` and may import both; nothing below imports it (see docs/architecture.md)."""
