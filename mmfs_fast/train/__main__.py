import sys

from mmfs_fast.train.cli import main

sys.exit(main())
