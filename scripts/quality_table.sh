#!/usr/bin/env bash
# The quality table of docs/QUALITY.md: next-token NLL of SmolLM2-135M and Gemma-3-270M on two
# books, one 8192-token run per (model, book, attention) with per-position NLL (--bucket 1).
# By causality the mean over the first L-1 predicted positions of that run is exactly the NLL of
# an L-token run, so 2k / 4k / 8k come from the same run. Results: $OUT/*.json and table.md.
# Usage: scripts/quality_table.sh [OUT] (env: MODELS="smollm2 gemma3", BOOKS, SPECS separated by `;`, TOKENS).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-quality-report}
CACHE=${LONGATTN_CACHE:-$HOME/.cache/longattn}
MODELS=${MODELS:-"smollm2 gemma3"}
BOOKS=${BOOKS:-"austen-emma.txt melville-moby_dick.txt"}
TOKENS=${TOKENS:-8192}
SPECS=${SPECS:-"exact;causal & (sinks(4) | window(256,0));causal & window(512,0)"}
mkdir -p "$OUT"
cargo build --release -q -p longattn-cli
B=target/release/longattn
IFS=';' read -ra SPEC_LIST <<< "$SPECS"
for m in $MODELS; do
  case $m in
    smollm2) G=$CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ;;
    gemma3) G=$CACHE/gemma3/gemma-3-270m-q4_k_m.gguf ;;
    *) echo "unknown model $m"; exit 1 ;;
  esac
  for b in $BOOKS; do
    for i in "${!SPEC_LIST[@]}"; do
      s=${SPEC_LIST[$i]}
      j=$OUT/${m}_${b%.txt}_$i.json
      [ -f "$j" ] && continue
      echo "== $m $b [$s]"
      $B eval --model "$G" --text "$CACHE/gutenberg/$b" --tokens "$TOKENS" --attention "$s" --bucket 1 --json "$j" > "${j%.json}.txt"
      head -1 "${j%.json}.txt"
    done
  done
done
python3 - "$OUT" <<'PY'
import glob, json, math, sys
out = sys.argv[1]
rows = []
for f in sorted(glob.glob(f"{out}/*.json")):
    r = json.load(open(f))
    nll = [b["nll"] for b in r["nll_by_bucket"]]
    cells = []
    for L in (2048, 4096, 8192):
        if L <= r["tokens"]:
            m = sum(nll[: L - 1]) / (L - 1)
            cells.append(f"{m:.4f} ({math.exp(m):.2f})")
        else:
            cells.append("-")
    rows.append((r["model"].split("/")[-1], r["text"].split("/")[-1], r["attention"], cells, r["seconds"]))
with open(f"{out}/table.md", "w") as t:
    t.write("| model | book | attention | 2k | 4k | 8k | seconds (8k run) |\n|---|---|---|---|---|---|---|\n")
    for m, b, a, c, s in rows:
        a = a.replace("|", "\\|")  # a literal | inside a markdown table cell
        t.write(f"| {m} | {b} | `{a}` | {c[0]} | {c[1]} | {c[2]} | {s:.0f} |\n")
print(open(f"{out}/table.md").read())
PY
