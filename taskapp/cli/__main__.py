"""`python -m taskapp.cli`: the same as the `taskapp` console script."""

import sys

from . import main

sys.exit(main())
