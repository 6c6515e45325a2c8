import sys

from mmfs_fast.serve.server import main

sys.exit(main())
