#!/usr/bin/env python3
"""Make the small demo retrieval set shipped in data/demo/ from a rustbooks BEIR folder.

The rustbooks set is built by make_corpus.py from the mdBook sites that ship with the Rust toolchain
(`$(rustc --print sysroot)/share/doc/rust/html`). This script keeps two whole books of it, the Rustonomicon
and the Rust Edition Guide (both dual-licensed MIT / Apache-2.0, like the rest of the Rust documentation):
every passage of those books, every query whose relevant passages all lie in them, and those judgements.

usage: make_demo.py RUSTBOOKS_DIR OUTDIR
"""
import json
import os
import sys

BOOKS = ("nomicon", "edition-guide")


def main(src: str, out: str) -> None:
    keep = lambda doc_id: doc_id.split("/", 1)[0] in BOOKS  # noqa: E731
    corpus = [json.loads(l) for l in open(os.path.join(src, "corpus.jsonl"), encoding="utf-8")]
    corpus = [d for d in corpus if keep(d["_id"])]
    qrels = {}
    with open(os.path.join(src, "qrels", "test.tsv"), encoding="utf-8") as f:
        next(f)
        for line in f:
            q, d, s = line.rstrip("\n").split("\t")
            qrels.setdefault(q, []).append((d, s))
    qrels = {q: ds for q, ds in qrels.items() if all(keep(d) for d, _ in ds)}
    queries = [json.loads(l) for l in open(os.path.join(src, "queries.jsonl"), encoding="utf-8")]
    queries = [q for q in queries if q["_id"] in qrels]
    os.makedirs(os.path.join(out, "qrels"), exist_ok=True)
    with open(os.path.join(out, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for d in corpus:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "queries.jsonl"), "w", encoding="utf-8") as f:
        for q in queries:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "qrels", "test.tsv"), "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in queries:
            for d, s in qrels[q["_id"]]:
                f.write(f"{q['_id']}\t{d}\t{s}\n")
    print(f"{len(corpus)} passages, {len(queries)} queries, "
          f"{sum(len(qrels[q['_id']]) for q in queries)} judgements -> {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
