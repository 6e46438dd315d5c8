#!/usr/bin/env python3
"""Evaluates the official checkpoints of the model zoo manifest and compares them with the published numbers.

    python tools/model_zoo.py --weights DIR [--imagenet PATH] [--kinetics PATH] [--rows PATTERN] [--out DIR]
        [--manifest FILE] [KEY VALUE ...]
    python tools/model_zoo.py --write-doc     (rewrites the "Official checkpoints" section of MODEL_ZOO.md)
    python tools/model_zoo.py --list

Each row of the manifest (configs/model_zoo.yaml) whose file is in DIR is evaluated as

    tools/run_net.py --cfg <row config> <row overrides> KEY VALUE ... TRAIN.ENABLE False
        TEST.CHECKPOINT_FILE_PATH DIR/<file> DATA.PATH_TO_DATA_DIR <--imagenet or --kinetics PATH>

would evaluate it (the same test job: multi-view for video, any NUM_GPUS / NUM_PROCS), with OUTPUT_DIR
<out>/runs/<row> (its logs and json_stats.log). KEY VALUE overrides apply to every row (e.g. NUM_GPUS 0
TEST.BATCH_SIZE 8). Rows whose file is not in DIR are listed as not found; rows of a data set whose path was not
given, as skipped.

Before a file is loaded, its hash is checked against the one its release names (rows that have one): a mismatch
is an error naming the file, the expected and the actual hash. That row, like a row whose evaluation fails with a
vitadapt error, is marked failed and the run goes on with the next row: a zoo run takes hours, one bad download
should not cost the others (any other exception stops the run). A progress line per row; <out>/model_zoo.md and
<out>/model_zoo.json (reproduced vs published top-1, top-5 and GMACs, with the deltas) are rewritten after every
row. Exit status: 0 when rows were evaluated and none failed, 1 when one failed, 2 for bad input (manifest,
options, a folder that does not exist, a KEY VALUE a row's config refuses), found before anything is evaluated,
3 when no row was evaluated (every chosen row not found in DIR or without its data set's folder): a run that
checked nothing is not a success.
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from vitadapt import zoo  # noqa: E402
from vitadapt.errors import VitadaptError  # noqa: E402
from vitadapt.utils.logging import read_json_stats  # noqa: E402

MANIFEST = os.path.join(REPO, "configs", "model_zoo.yaml")
DOC = os.path.join(REPO, "MODEL_ZOO.md")
DATA_OPTION = {"imagenet": "--imagenet", "kinetics": "--kinetics"}
NOTHING_EVALUATED = 3  # the exit status of a run in which no row was evaluated
# Keys the tool sets for every row, and to what.
OWN_KEYS = {"OUTPUT_DIR": "<--out>/runs/<row>", "TRAIN.ENABLE": "False", "TEST.ENABLE": "True",
            "TEST.CHECKPOINT_FILE_PATH": "<--weights>/<the row's file>",
            "DATA.PATH_TO_DATA_DIR": "--imagenet or --kinetics"}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="folder holding the downloaded checkpoint files")
    parser.add_argument("--imagenet", help="ImageNet folder (train/ and val/ class folders)")
    parser.add_argument("--kinetics", help="Kinetics folder ({train,val,test}.csv)")
    parser.add_argument("--rows", default="*", help="rows to consider: globs separated by commas ('evit_*,deit_*'), "
                                                    "or re:REGEX")
    parser.add_argument("--out", default=os.path.join("runs", "model_zoo"), help="results folder")
    parser.add_argument("--manifest", default=MANIFEST, help="model zoo manifest (default: configs/model_zoo.yaml)")
    parser.add_argument("--write-doc", action="store_true", help="rewrite the generated section of --doc and exit")
    parser.add_argument("--doc", default=DOC, help="the file --write-doc rewrites (default: MODEL_ZOO.md)")
    parser.add_argument("--list", action="store_true", help="list the rows of the manifest and exit")
    args, opts = parser.parse_known_args(argv)
    flags = [o for o in opts if o.startswith("--")]
    if flags:  # a mistyped option would otherwise reach the configs as a key
        parser.error(f"unrecognized argument: {flags[0]}")
    if len(opts) % 2:
        parser.error(f"overrides must be KEY VALUE pairs; '{opts[-1]}' has no value")
    for key in opts[0::2]:
        if key in OWN_KEYS:
            parser.error(f"{key} is set by tools/model_zoo.py for every row (to {OWN_KEYS[key]})")
    if not (args.write_doc or args.list):
        if not args.weights:
            parser.error("--weights DIR is required")
        if not (args.imagenet or args.kinetics):
            parser.error("give --imagenet PATH and/or --kinetics PATH")
        # Before any file is hashed or row evaluated: a mistyped data path would otherwise fail every row.
        for option in ("--weights",) + tuple(DATA_OPTION.values()):
            path = getattr(args, option[2:])
            if path and not os.path.isdir(path):
                parser.error(f"{option} is not a folder: {path}")
    return args, opts


def write_doc(args) -> None:
    rows = zoo.load_manifest(args.manifest)
    zoo.check_configs(rows)
    with open(args.doc) as f:
        text = f.read()
    new = zoo.replace_doc_section(text, zoo.doc_section(rows, REPO), args.doc)
    if new != text:
        with open(args.doc + ".tmp", "w") as f:
            f.write(new)
        os.replace(args.doc + ".tmp", args.doc)
    print(f"{args.doc}: {'rewritten' if new != text else 'already up to date'} ({len(rows)} rows)")


def plan(row, args) -> tuple:
    """(status, reason) of a row before evaluation: evaluate, or why not."""
    data = getattr(args, row.dataset)
    if not data:
        return "skipped", f"no {DATA_OPTION[row.dataset]} given"
    if not os.path.isfile(os.path.join(args.weights, row.file)):
        return "not found", f"{row.file} is not in {args.weights}"
    return "evaluate", ""


def evaluate(row, args, opts, digests) -> dict:
    """Checks the row's file, runs the test job on it, returns its test_final statistics."""
    from vitadapt.engine import launch_job, test

    path = os.path.join(args.weights, row.file)
    if row.hash:
        zoo.check_hash(path, row.hash, digests)
    run_dir = os.path.join(args.out, "runs", row.name)
    cfg = zoo.load_row_config(row, list(opts) + [
        "TRAIN.ENABLE", False, "TEST.ENABLE", True, "TEST.CHECKPOINT_FILE_PATH", path,
        "DATA.PATH_TO_DATA_DIR", getattr(args, row.dataset), "OUTPUT_DIR", run_dir], check_files=True)
    log = os.path.join(run_dir, "json_stats.log")
    before = len(read_json_stats(run_dir)) if os.path.isfile(log) else 0
    launch_job(cfg, test)
    # Read from the run's log rather than returned: spawned processes (NUM_GPUS / NUM_PROCS > 1) return nothing.
    final = [r for r in read_json_stats(run_dir)[before:] if r.get("_type") == "test_final"]
    if not final:
        raise VitadaptError(f"row {row.name}: the test job wrote no test_final record to {log}")
    return final[-1]


def shown(path: str) -> str:
    """A path inside the repository relative to it, others as they are."""
    inside = os.path.abspath(path).startswith(REPO + os.sep)
    return os.path.relpath(path, REPO) if inside else path


def progress(i: int, n: int, row, text: str) -> None:
    print(f"[model_zoo {i}/{n}] {row.name}: {text}", flush=True)


def summary(result: dict) -> str:
    parts = []
    for metric, label, digits in (("top1", "top-1", 2), ("gmacs", "GMACs", 3)):
        mine, theirs, delta = (result[k].get(metric) for k in ("reproduced", "published", "delta"))
        published = "not published" if theirs is None else f"published {theirs}, delta {delta:+.{digits}f}"
        parts.append(f"{label} {mine:.{digits}f} ({published})")
    return ", ".join(parts) + f" in {result['seconds']:.0f} s"


def run(args, opts) -> int:
    rows = zoo.select(zoo.load_manifest(args.manifest), args.rows)
    zoo.check_configs(rows, opts)  # every refusal before hours of evaluation
    meta = {"manifest": os.path.abspath(args.manifest), "weights": os.path.abspath(args.weights),
            "imagenet": args.imagenet, "kinetics": args.kinetics, "overrides": " ".join(map(str, opts))}
    results, digests = [], {}
    for i, row in enumerate(rows, 1):
        status, reason = plan(row, args)
        result = {"name": row.name, "status": status, "reason": reason, "file": row.file, "hash": row.hash,
                  "config": shown(row.config), "model": row.model,
                  "overrides": {k: str(v) for k, v in row.overrides.items()},
                  "dataset": row.dataset, "views": row.views, "published": dict(row.published), "reproduced": {},
                  "delta": {}, "source": row.source}
        if status == "evaluate":
            progress(i, len(rows), row, f"evaluating {row.file} ({result['config']})")
            start = time.perf_counter()
            try:
                stats = evaluate(row, args, opts, digests)
                result["reproduced"] = zoo.reproduced(stats, row)
                result.update(status="evaluated", delta=zoo.deltas(result["reproduced"], row.published),
                              run_dir=os.path.join(args.out, "runs", row.name))
            except VitadaptError as e:
                result.update(status="failed", reason=str(e))
                print(f"error: {e}", file=sys.stderr, flush=True)
            result["seconds"] = time.perf_counter() - start
            progress(i, len(rows), row, summary(result) if result["status"] == "evaluated" else
                     f"FAILED: {result['reason'].splitlines()[0]}")
        else:
            progress(i, len(rows), row, f"{status} ({reason})")
        results.append(result)
        zoo.write_results(args.out, results, meta)
    failed = [r["name"] for r in results if r["status"] == "failed"]
    print(f"[model_zoo] results: {os.path.join(args.out, 'model_zoo.md')} and model_zoo.json"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    if failed:
        return 1
    if not any(r["status"] == "evaluated" for r in results):
        print(f"error: no row was evaluated ({zoo.status_counts(results)}): put the rows' files into "
              f"{args.weights} and give the data set folder of the rows you want ({' / '.join(DATA_OPTION.values())});"
              " each row's reason is in the table", file=sys.stderr, flush=True)
        return NOTHING_EVALUATED
    return 0


def main(argv=None) -> int:
    args, opts = parse(argv)
    try:
        if args.write_doc:
            write_doc(args)
            return 0
        if args.list:
            for row in zoo.load_manifest(args.manifest):
                print(f"{row.name:32s} {row.model:44s} {row.dataset:9s} {row.file}")
            return 0
        return run(args, opts)
    except VitadaptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
