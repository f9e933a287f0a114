"""Split and check tools for nanoCAMTL's data roots: (re)write a root's splits.json keeping what the converters'
sets assigned, and scan every split for bad inputs. Training never calls them; convert.py and the CLI do.

    python splits.py split --root R [--group REGEX] [--set NAME] [--resplit val|test]
        (re)split what no set assigned, and the images splits.json does not list yet, 70/30/0 (--group: a file-name
        regex keeps a patient's images together; --set NAME, repeatable: that set's images too). What is listed in
        val or test stays there unless --resplit names the split.
    python splits.py check --root R [--nc N] [--write-splits]
        scan every split, name each bad file (exit status 1 if any is skipped); changes nothing on disk unless
        --write-splits writes a missing splits.json

Held out means held out (`pinned`): a val or test listing moves only when the command names its split, and an
official val or test image never, so no command moves test images into training.

Why a file of its own: data.py stays the training pipeline (layout, reading, datasets, loaders) and these tools use
only its splits.json helpers and datasets; imports go data <- splits <- convert, never back.
"""
import argparse
import os
import re
import sys
from collections import Counter
from pathlib import Path

from data import (SPLITS, TASK_KEYS, TaskDataset, _warn_unlisted, group_key, log, make_splits, read_splits,
                  split_entries, task_files, write_splits)

# -----------------------------------------------------------------------------
# re-splitting


def pinned(e, split, sets=(), named=()):
    """The split a listed entry must stay in, or None when it may be re-split. Held out means held out: an entry
    listed in val or test stays there, official or not, unless the command names that split (`named`, from
    --resplit); an official val or test entry stays even then, so no command moves a set's test images into
    training. A set's entries also stay in train unless the set is named (sets, lower case)."""
    if e.get("set") and e["set"].lower() not in sets:
        return split
    if e.get("official") in ("val", "test"):
        return e["official"]
    return split if split in ("val", "test") and split not in named else None


def resplit(per, new=(), sets=(), ratios=(0.7, 0.3, 0.0), seed=42, group_regex=None, named=()):
    """One task's {split: entries} plus new entries (listed nowhere yet) -> ({split: entries}, moves). What `pinned`
    keeps stays; a free entry whose group (`group_key`) is kept in val or test joins it; the other free entries are
    split by group (split_entries). moves: Counter of (set or None, from split or "new", to split)."""
    out, free = {s: [] for s in SPLITS}, []
    for s in SPLITS:
        for e in per.get(s, []):
            p = pinned(e, s, sets, named)
            (out[p] if p else free).append((e, s))
    free += [(e, "new") for e in new]
    held = {group_key(e, group_regex): s for s in ("val", "test") for e, _ in out[s]}
    rest = []
    for e, frm in free:
        s = held.get(group_key(e, group_regex))
        (out[s] if s else rest).append((e, frm))
    origin = {id(e): frm for e, frm in rest}
    for s, es in split_entries([e for e, _ in rest], ratios, seed, group_regex).items():
        out[s] += [(e, origin[id(e)]) for e in es]
    moves = Counter((e.get("set"), frm, s) for s, v in out.items() for e, frm in v)
    return {s: sorted((e for e, _ in v), key=lambda e: e["image"]) for s, v in out.items()}, moves


def log_moves(key, moves):
    """One line per set and former split of a task: how many images went to which split."""
    order = {s: i for i, s in enumerate((*SPLITS, "new"))}
    rows = {}
    for (st, frm, to), n in sorted(moves.items(), key=lambda kv: (kv[0][0] or "", order[kv[0][1]], order[kv[0][2]])):
        rows.setdefault((st, frm), []).append((to, n))
    for (st, frm), tos in rows.items():
        log(f"{key}: {st or 'no set'} {frm} {sum(n for _, n in tos)} -> " + ", ".join(f"{to} {n}" for to, n in tos))


def split_root(root, splits, keys=tuple(TASK_KEYS), sets=(), group_regex=None, seed=42, new=None, named=()):
    """(Re)split root/splits.json keeping what sets assigned: per task in keys, `resplit` of what splits lists (each
    image once, its test listing first; those whose image is gone dropped) plus the task folder's images it does not
    list, as new, and new[key] (entries a converter has just written). splits None (no splits.json): every task from
    its folder. named: the splits whose listings may move too (--resplit). Logs the moves, writes splits.json and
    returns it."""
    root, new = Path(root), new or {}
    splits, keys = ({}, tuple(TASK_KEYS)) if splits is None else (splits, keys)
    for key in keys:
        written = new.get(key, [])
        seen = {os.path.normpath(root / e["image"]) for e in written}
        per, dropped = {s: [] for s in SPLITS}, 0
        for s in ("test", "val", "train"):
            for e in splits.get(key, {}).get(s, []):
                p = os.path.normpath(root / e["image"])
                if p in seen or not os.path.exists(p):
                    dropped += 1
                    continue
                seen.add(p)
                per[s].append(e)
        if dropped:
            log(f"{key}: {dropped} listings dropped (an image listed again, or gone from disk)")
        fresh = written + [e for e in task_files(root, key) if os.path.normpath(root / e["image"]) not in seen]
        splits[key], moves = resplit(per, fresh, sets, seed=seed, group_regex=group_regex, named=named)
        log_moves(key, moves)
    write_splits(root, splits)
    return splits


def recorded_sets(splits, names):
    """The --set names (any case) -> lower-case names, each one splits.json records; else SystemExit naming them."""
    known = sorted({e["set"] for per in (splits or {}).values() for v in per.values() for e in v if e.get("set")})
    for n in names:
        if n.lower() not in {k.lower() for k in known}:
            raise SystemExit(f"--set {n}: splits.json records no such set; it records the sets "
                             f"{', '.join(known) or '(none)'}")
    return {n.lower() for n in names}


def duplicates(root, splits):
    """Images a task of splits lists more than once -> [(path, task key, [the splits listing it])]."""
    out = []
    for key, per in splits.items():
        where = {}
        for s in SPLITS:
            for e in per.get(s, []):
                where.setdefault(os.path.normpath(Path(root) / e["image"]), []).append(s)
        out += [(p, key, v) for p, v in where.items() if len(v) > 1]
    return out

# -----------------------------------------------------------------------------
# the CLI


def main(argv=None):
    """The CLI; returns the exit status (check: 1 if any file was skipped as bad)."""
    ap = argparse.ArgumentParser(description="nanoCAMTL data tools (synthetic data: python synthetic.py)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("split", help="(re)split what no set assigned (and the images splits.json does not list yet) "
                                     "70/30/0, optionally grouped by a file-name regex; sets' splits are kept")
    a.add_argument("--root", required=True)
    a.add_argument("--group", default=None, help="regex on file names: its first group keys the split")
    a.add_argument("--set", action="append", default=[], metavar="NAME",
                   help="re-split this set's images too (repeatable); its official val and test stay")
    a.add_argument("--resplit", action="append", default=[], choices=("val", "test"),
                   help="let this split's listings move too (repeatable); without it, whatever is listed in val or "
                   "test stays there, and an official val or test image stays even with it")
    a = sub.add_parser("check", help="scan every split for bad inputs (exit status 1 if any file is skipped); "
                                     "changes nothing on disk")
    a.add_argument("--root", required=True)
    a.add_argument("--nc", type=int, default=1)
    a.add_argument("--write-splits", action="store_true",
                   help="without splits.json: write the one it checked (default: check it in memory only)")
    args = ap.parse_args(argv)
    if not Path(args.root).is_dir():
        raise SystemExit(f"{args.cmd}: --root {args.root} is not a directory; give the processed data root (README: "
                         "data layout)")
    if getattr(args, "group", None):
        try:
            re.compile(args.group)
        except re.error as e:
            raise SystemExit(f"--group {args.group!r}: not a valid regular expression ({e})") from None
    if args.cmd == "split":
        splits = read_splits(args.root)
        split_root(args.root, splits, sets=recorded_sets(splits, args.set), group_regex=args.group,
                   named=tuple(args.resplit))
    elif args.cmd == "check":
        if args.nc < 1:
            raise SystemExit(f"--nc {args.nc}: must be >= 1")
        splits = read_splits(args.root)
        if splits is None:
            splits = make_splits(args.root)
            if args.write_splits:
                write_splits(args.root, splits)
                log(f"wrote {Path(args.root) / 'splits.json'}")
            else:
                log(f"no {Path(args.root) / 'splits.json'}: checking the 70/30/0 split training would write "
                    "(not written; --write-splits writes it)")
        else:
            _warn_unlisted(args.root, splits)
        skipped, total = 0, 0
        for key in TASK_KEYS:
            for s in SPLITS:
                ds = TaskDataset(args.root, key, s, nc=args.nc, splits=splits)
                skipped += sum(act == "skipped" for *_, act in ds.problems)
                total += len(ds) + sum(act == "skipped" for *_, act in ds.problems)
        dups = duplicates(args.root, splits)
        for path, key, where in dups:
            log(f"{path}: listed {len(where)} times in {key} ({', '.join(where)}) -> counted once")
        total -= sum(len(where) - 1 for *_, where in dups)
        if not total:
            log(f"check: no images in any task folder of {args.root} (README: data layout)")
            return 1
        if skipped:
            log(f"check: {skipped} of {total} files skipped as bad (listed above)")
        if dups:
            log(f"check: {len(dups)} of {total} images listed more than once (above); `python splits.py split --root "
                f"{args.root}` lists each once, a test listing first")
        if skipped or dups:
            return 1
        log(f"check: all {total} images usable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
