"""`python -m fvkernels …`: the command line (fvkernels.app.cli)."""
import sys

from fvkernels.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
