import sys

from clmtl.cli import main

sys.exit(main())
