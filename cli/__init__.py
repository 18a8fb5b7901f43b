"""lessserve.cli: the `lessserve` command. Parses flags into pydantic config and calls library
functions; every known error becomes exit code 2 and one line naming the flag (cli/main.py)."""
