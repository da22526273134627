"""``python -m lowbit.cli``: the ``lowbit`` command."""

from lowbit.cli import console_main

console_main()
