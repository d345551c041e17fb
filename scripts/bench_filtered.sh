#!/usr/bin/env bash
# Filtered and hybrid search on rustbooks (issue "Index"): recall@10 of filtered search against exact MaxSim
# over the matching documents at 0.1 %, 1 %, 10 % and 50 % selectivity with single-query latency, and nDCG@10
# of MaxSim, BM25 and hybrid (rrf, linear 0.5).
#
#   scripts/bench_filtered.sh MODEL_DIR OUT_DIR [BEIR_DIR]
#
# Needs release builds: cargo build --release -p latte && cargo build --release -p latte-index --example bench
# OUT_DIR keeps the index and the query embeddings; SKIP_BUILD=1 reuses them.
set -euo pipefail
M=$1
OUT=$2
DATA=${3:-../shared/data/rustbooks}
L=${LATTE:-target/release/latte}
B=${BENCH:-target/release/examples/bench}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
mkdir -p "$OUT"
grep -m1 'model name' /proc/cpuinfo
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  python3 scripts/make_filter_corpus.py "$DATA/corpus.jsonl" "$OUT/corpus.jsonl"
  rm -rf "$OUT/idx"
  /usr/bin/time -v "$L" index --index "$OUT/idx" --model "$M" --corpus "$OUT/corpus.jsonl" 2> "$OUT/index.time"
  "$L" encode --model "$M" --input "$DATA/queries.jsonl" --queries --output "$OUT/queries.npz" \
    --ids-output "$OUT/queries.ids"
fi
"$L" info --index "$OUT/idx"
# filtered recall and latency (first 500 queries)
"$B" filtered "$OUT/idx" "$OUT/queries.npz" --nq 500 --per-mille 1,10,100,500
# nDCG@10: MaxSim, BM25, hybrid (all 1,527 queries)
"$L" search --index "$OUT/idx" --query-embeddings "$OUT/queries.npz" --query-ids "$OUT/queries.ids" --k 100 --output "$OUT/maxsim.trec"
"$L" search --index "$OUT/idx" --queries "$DATA/queries.jsonl" --bm25-only --k 100 --output "$OUT/bm25.trec"
"$L" search --index "$OUT/idx" --queries "$DATA/queries.jsonl" --hybrid --k 100 --output "$OUT/hybrid_rrf.trec"
"$L" search --index "$OUT/idx" --queries "$DATA/queries.jsonl" --hybrid --fusion linear --alpha 0.5 --k 100 --output "$OUT/hybrid_linear.trec"
for run in maxsim bm25 hybrid_rrf hybrid_linear; do
  echo "== $run"
  "$L" eval --run "$OUT/$run.trec" --qrels "$DATA/qrels/test.tsv" --metrics ndcg@10,recall@100
done
