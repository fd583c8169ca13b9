"""The ``cdft`` command line (installed as the ``cdft_cli`` package)."""
