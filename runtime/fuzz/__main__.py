"""`python -m attnc.runtime.fuzz`: the same program as `attnc fuzz`."""
import sys

from .driver import main

sys.exit(main())
