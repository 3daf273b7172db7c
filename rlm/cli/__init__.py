"""The `rlm` command line (`rlm ask`, `rlm models`, `rlm --version`); entry point `rlm.cli.main:run`."""
