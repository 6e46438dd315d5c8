#!/usr/bin/env python3
"""Train, then test, per the config:  python tools/run_net.py --cfg CONFIG.yaml [KEY VALUE ...]"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vitadapt.config import ConfigError, load_config, parse_args  # noqa: E402
from vitadapt.engine import launch_job, test, train  # noqa: E402
from vitadapt.errors import VitadaptError  # noqa: E402
from vitadapt.utils.logging import log_to_file_only  # noqa: E402


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)
    try:
        cfg = load_config(args.cfg_file, args.opts, check_files=True)
        if not (cfg.TRAIN.ENABLE or cfg.TEST.ENABLE):
            raise ConfigError("TRAIN.ENABLE and TEST.ENABLE are both False: nothing to do")
        if cfg.TRAIN.ENABLE:
            launch_job(cfg, train, args.init_method)
        if cfg.TEST.ENABLE:
            launch_job(cfg, test, args.init_method)
    except VitadaptError as e:
        log_to_file_only(f"error: {e}")  # the console gets it once, on stderr
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
