import sys

from eplb.coordinator.cli import main

sys.exit(main())
