#!/usr/bin/env bash
# --dtype f32|bf16|int8: accuracy and speed of reduced-precision encoding (Task I of the Speed issue).
#
#   scripts/bench_dtype.sh MODEL_DIR BEIR_DIR [OUT_DIR]
#
# MODEL_DIR: a ColBERT model (the MiniLM ColBERT of scripts/make_minilm_colbert.py); BEIR_DIR: a BEIR folder
# (rustbooks). LATTE: the binary (default target/release/latte, else target/debug/latte). Prints, for
# bf16 and int8 against f32, the mean per-token cosine over the first 1,000 passages; the docs/s of
# `latte encode` on them (batch 32, RAYON_NUM_THREADS=2); and nDCG@10 of `latte evaluate` (PLAID, defaults)
# for each dtype (EVAL_DTYPES to choose them; EVAL_DOCS=N on the first N passages and the queries judged
# against them). SKIP_ENCODE=1 skips the encode timings and cosines, SKIP_EVAL=1 the evaluations.
set -euo pipefail
model=${1:?usage: bench_dtype.sh MODEL_DIR BEIR_DIR [OUT_DIR]}
data=${2:?usage: bench_dtype.sh MODEL_DIR BEIR_DIR [OUT_DIR]}
out=${3:-$(mktemp -d)}
latte=${LATTE:-}
if [ -z "$latte" ]; then
  if [ -x target/release/latte ]; then latte=target/release/latte; else latte=target/debug/latte; fi
fi
mkdir -p "$out"
echo "binary: $latte; cpu: $(lscpu | sed -n 's/^Model name: *//p'); load: $(uptime | sed 's/.*average: //')"
head -n 1000 "$data/corpus.jsonl" > "$out/passages.jsonl"

if [ "${SKIP_ENCODE:-0}" != 1 ]; then
for dtype in f32 bf16 int8; do
  start=$(date +%s.%N)
  RAYON_NUM_THREADS=2 "$latte" encode --model "$model" --input "$out/passages.jsonl" \
    --output "$out/emb-$dtype.npz" --batch-size 32 --dtype "$dtype"
  end=$(date +%s.%N)
  python3 -c "import sys; s=float(sys.argv[2])-float(sys.argv[1]); print(f'encode {sys.argv[3]}: 1000 passages in {s:.1f} s = {1000/s:.1f} docs/s')" \
    "$start" "$end" "$dtype"
done

# Mean per-token cosine against f32 (standard library only: .npz is a zip of .npy files).
python3 - "$out" <<'PY'
import array, ast, math, sys, zipfile

def load(path):
    mats = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            raw = z.read(name)
            hlen = int.from_bytes(raw[8:10], "little") if raw[6] == 1 else int.from_bytes(raw[8:12], "little")
            start = 10 + hlen if raw[6] == 1 else 12 + hlen
            header = ast.literal_eval(raw[start - hlen:start].decode("latin1"))
            assert header["descr"] == "<f4" and not header["fortran_order"], header
            a = array.array("f")
            a.frombytes(raw[start:])
            mats[name] = (header["shape"], a)
    return mats

out = sys.argv[1]
ref = load(f"{out}/emb-f32.npz")
for dtype in ("bf16", "int8"):
    got = load(f"{out}/emb-{dtype}.npz")
    assert got.keys() == ref.keys()
    total, count, worst = 0.0, 0, 1.0
    for name, (shape, a) in ref.items():
        gshape, b = got[name]
        assert gshape == shape, (name, shape, gshape)
        rows, dim = shape
        for r in range(rows):
            u, v = a[r * dim:(r + 1) * dim], b[r * dim:(r + 1) * dim]
            dot = sum(x * y for x, y in zip(u, v))
            nu = math.sqrt(sum(x * x for x in u))
            nv = math.sqrt(sum(y * y for y in v))
            c = dot / (nu * nv) if nu > 0 and nv > 0 else 1.0
            total += c
            count += 1
            worst = min(worst, c)
    print(f"{dtype} vs f32: mean per-token cosine {total / count:.6f} over {count} tokens "
          f"of {len(ref)} passages (lowest {worst:.6f})")
PY
fi

# EVAL_DOCS=N evaluates on a BEIR subset: the first N passages and the queries judged against them.
eval_data=$data
if [ -n "${EVAL_DOCS:-}" ]; then
  eval_data=$out/subset-$EVAL_DOCS
  python3 - "$data" "$eval_data" "$EVAL_DOCS" <<'PY'
import json, os, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(f"{dst}/qrels", exist_ok=True)
with open(f"{src}/corpus.jsonl") as f:
    docs = [l for l in f if l.strip()][:n]
ids = {json.loads(l)["_id"] for l in docs}
with open(f"{dst}/corpus.jsonl", "w") as f:
    f.writelines(docs)
kept, qids = [], set()
with open(f"{src}/qrels/test.tsv") as f:
    header = f.readline()
    for l in f:
        q, d = l.split("\t")[:2]
        if d in ids:
            kept.append(l)
            qids.add(q)
with open(f"{dst}/qrels/test.tsv", "w") as f:
    f.write(header)
    f.writelines(kept)
with open(f"{src}/queries.jsonl") as f, open(f"{dst}/queries.jsonl", "w") as g:
    g.writelines(l for l in f if l.strip() and json.loads(l)["_id"] in qids)
print(f"subset: {len(docs)} passages, {len(qids)} queries, {len(kept)} judgments")
PY
fi
if [ "${SKIP_EVAL:-0}" != 1 ]; then
  for dtype in ${EVAL_DTYPES:-f32 bf16 int8}; do
    echo "evaluate $dtype:"
    RAYON_NUM_THREADS=2 "$latte" evaluate --model "$model" --dataset "$eval_data" --dtype "$dtype" \
      --index-dir "$out/index-$dtype"
  done
fi
