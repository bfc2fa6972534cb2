import sys
from hardwire.cli import main

sys.exit(main())
