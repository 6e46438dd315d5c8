#!/usr/bin/env python3
"""Compares vitadapt with the official code on golden files:  python tools/check_parity.py FILE.pt [FILE.pt ...]

Prints one line per compared quantity (max |diff|, OK or MISMATCH) and exits non-zero on any mismatch.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from vitadapt.parity import check_file  # noqa: E402


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # the goldens were recorded single-threaded
    failed = 0
    for path in paths:
        print(path)
        try:
            comparisons = check_file(path)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            print(f"  error: {e}")
            failed += 1
            continue
        for c in comparisons:
            print("  " + c.line())
        failed += sum(not c.ok for c in comparisons)
    print(f"{'all match' if not failed else f'{failed} mismatch(es)'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
