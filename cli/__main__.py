"""`python -m cli`, for tests and scripts that lack the console script."""

from cli import main

main()
