"""`python -m warm_hub` runs the `warm-hub` command line."""

from warm_hub.cli import console_main

console_main()
