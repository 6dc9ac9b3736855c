import sys

from megatron_vcap.cli import main

sys.exit(main())
