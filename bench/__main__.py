"""``python -m bench``: run the benchmark and write its report (see ``--help``)."""

from bench.cli import main

if __name__ == "__main__":
    main()
