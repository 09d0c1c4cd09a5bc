import sys

from gkcore.cli import main

sys.exit(main())
