"""`python -m rlm`: the same command line as `rlm`."""

from rlm.cli.main import run

if __name__ == "__main__":
    run()
