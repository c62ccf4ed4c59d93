import sys

from pyro_vmm.cli import main

sys.exit(main())
