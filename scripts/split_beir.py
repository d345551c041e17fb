#!/usr/bin/env python3
"""Split a BEIR folder's queries into a training and a held-out split (deterministic, by a hash of the
query id), for the fine-tuning benchmark:

    python3 scripts/split_beir.py ../shared/data/rustbooks $WORK/rb-split --from test --train-share 0.65

writes OUT/corpus.jsonl and OUT/queries.jsonl (symlinks to the source) and OUT/qrels/train.tsv,
OUT/qrels/test.tsv: a query lands in train when sha256(id) mod 1000 < 1000 · share. No third-party
packages.
"""

import argparse
import hashlib
import os


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--from", dest="split", default="test")
    ap.add_argument("--train-share", type=float, default=0.65)
    a = ap.parse_args()
    os.makedirs(os.path.join(a.out, "qrels"), exist_ok=True)
    for f in ("corpus.jsonl", "queries.jsonl"):
        dst = os.path.join(a.out, f)
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(os.path.abspath(os.path.join(a.src, f)), dst)
    lines = open(os.path.join(a.src, "qrels", f"{a.split}.tsv")).read().splitlines()
    header, rows = lines[0], lines[1:]
    out = {"train": [header], "test": [header]}
    for r in rows:
        qid = r.split("\t")[0]
        h = int(hashlib.sha256(qid.encode()).hexdigest(), 16) % 1000
        out["train" if h < 1000 * a.train_share else "test"].append(r)
    for name, rs in out.items():
        with open(os.path.join(a.out, "qrels", f"{name}.tsv"), "w") as f:
            f.write("\n".join(rs) + "\n")
        print(name, len({r.split("\t")[0] for r in rs[1:]}), "queries", len(rs) - 1, "judgments")


if __name__ == "__main__":
    main()
