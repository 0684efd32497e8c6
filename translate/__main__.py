"""Allow ``python3 -m translate``."""
import sys

from .cli import main

sys.exit(main())
