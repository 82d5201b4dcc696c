"""``python -m conspo_jax.sweep ...``: the sweep command without going through ``conspo``."""

import sys

from conspo_jax.sweep.cli import main

sys.exit(main())
