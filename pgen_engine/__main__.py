import sys

from pgen_engine.cli import main

sys.exit(main())
