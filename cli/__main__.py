"""``python -m cdft_cli`` runs the ``cdft`` command line."""

from cdft_cli.main import main

if __name__ == "__main__":
    main()
