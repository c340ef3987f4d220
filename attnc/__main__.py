"""`python -m attnc ...` runs the command line (see attnc/cli.py)."""
import sys

from .cli import main

sys.exit(main())
