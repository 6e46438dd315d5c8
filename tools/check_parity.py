#!/usr/bin/env python3
"""Compares vitadapt with the official code on golden files (shared/golden).

Prints, per file, one line per compared quantity (max |diff|, OK or MISMATCH), then a summary. Golden files of
kinds vitadapt has no parity check for yet (the video backbones) are listed as "not supported yet" and not
compared. A folder stands for every .pt file under it.

exit status: 0 every compared quantity matches (not-supported files aside); 1 a mismatch;
2 a file that is not a readable golden file, or no file with a parity check at all.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from vitadapt.errors import VitadaptError  # noqa: E402
from vitadapt.parity import GOLDEN_KINDS, PARITY_CHECKS, NotSupportedYet, check_file  # noqa: E402


def expand(paths):
    """(files, errors): files as given, a folder replaced by the .pt files under it (sorted); errors for folders
    without any."""
    files, errors = [], []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names if f.endswith(".pt"))
        files += found
        if not found:
            errors.append(f"error: {path}: a folder without .pt files")
    return files, errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", metavar="FILE.pt", help="golden files or folders of them, e.g. "
                        "../shared/golden/*/*.pt")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the goldens were recorded single-threaded
    files, errors = expand(args.files)
    for line in errors:
        print(line, file=sys.stderr)
    mismatches, compared, unsupported, unreadable = 0, 0, {}, len(errors)
    for path in files:
        try:
            comparisons = check_file(path)
        except NotSupportedYet as e:
            print(f"{path}: not supported yet ({GOLDEN_KINDS[e.kind]} golden file), not compared")
            unsupported.setdefault(e.kind, []).append(path)
            continue
        except VitadaptError as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            unreadable += 1
            continue
        print(path)
        for c in comparisons:
            print("  " + c.line())
        compared += 1
        mismatches += sum(not c.ok for c in comparisons)
    if compared:
        print("all match" if not mismatches else f"{mismatches} mismatch(es)", f"({compared} file(s) compared)")
    supported = ", ".join(GOLDEN_KINDS[k] for k in PARITY_CHECKS)
    if unsupported:
        kinds = ", ".join(f"{GOLDEN_KINDS[k]}: {len(v)}" for k, v in unsupported.items())
        print(f"not supported yet, not compared: {sum(map(len, unsupported.values()))} file(s) ({kinds}); "
              f"vitadapt has parity checks for {supported}")
    if unreadable and len(files) + len(errors) > 1:  # one file: its own error line says it all
        print(f"error: {unreadable} path(s) could not be checked (see above)", file=sys.stderr)
    if mismatches:
        return 1
    if not compared and not unreadable:
        print(f"error: nothing compared: vitadapt has parity checks for {supported} golden files only",
              file=sys.stderr)
    return 2 if unreadable or not compared else 0


if __name__ == "__main__":
    sys.exit(main())
