"""`python -m jaxdefense ...`: the same CLI as the `jaxdefense` script."""

import sys

from jaxdefense.cli import main

sys.exit(main())
