#!/usr/bin/env python3
"""Copy a BEIR corpus.jsonl, adding metadata for filter benchmarks.

Each line gains ``bucket`` (an integer in 0..999 from a stable hash of ``_id``, uniform, so the filter
``{"bucket": {"$lt": S}}`` selects S per mille of the corpus) and ``source`` (the ``_id`` up to its first
``/``; on rustbooks the book a passage comes from).

    python3 scripts/make_filter_corpus.py ../shared/data/rustbooks/corpus.jsonl corpus_meta.jsonl
"""
import hashlib
import json
import sys


def bucket(doc_id: str) -> int:
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % 1000


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: make_filter_corpus.py CORPUS.jsonl OUT.jsonl")
    src, dst = sys.argv[1], sys.argv[2]
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for line in fin:
            if not line.strip():
                continue
            doc = json.loads(line)
            doc_id = str(doc["_id"])
            doc["bucket"] = bucket(doc_id)
            doc["source"] = doc_id.split("/", 1)[0]
            fout.write(json.dumps(doc, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
