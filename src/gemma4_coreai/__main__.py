"""`python -m gemma4_coreai ...` is the `gemma4-coreai` command."""

import sys

from .cli import main

sys.exit(main())
