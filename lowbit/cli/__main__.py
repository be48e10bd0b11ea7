"""``python -m lowbit.cli``: the same as the ``lowbit`` command."""

from lowbit.cli.commands import main

if __name__ == "__main__":
    raise SystemExit(main())
