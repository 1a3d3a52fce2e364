"""Spillway's process-level plumbing shared by every deployable: logging, start-up checks
and the ``spillway`` command line (``spillway.cli``, imported only by the console script)."""
