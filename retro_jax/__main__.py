import sys

from retro_jax.cli import main

sys.exit(main())
