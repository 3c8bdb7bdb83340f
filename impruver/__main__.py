import sys

from impruver.cli import main

sys.exit(main())
