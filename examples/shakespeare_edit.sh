#!/usr/bin/env bash
# The main job: EDiT local SGD (4 workers, layer-wise sync, pseudo-gradient penalty) pretraining a small
# GPT on the embedded default corpus (Shakespeare), 4 ranks on CPU (gloo), a few minutes.
# Override the launcher with NPROC=8, or pass extra flags: bash examples/shakespeare_edit.sh --train-iters 50
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DATA=${DATA:-data}
NPROC=${NPROC:-4}
VOCAB=1024
PREFIX="$DATA/shakespeare_sp$VOCAB"

[ -f "$DATA/shakespeare.jsonl" ] || "$PY" tools/prepare_sample_corpus.py --output-dir "$DATA"
[ -f "$PREFIX.model" ] || "$PY" tools/train_tokenizer.py --input "$DATA/shakespeare.jsonl" \
    --vocab-size "$VOCAB" --model-prefix "$PREFIX"
[ -f "$PREFIX.idx" ] || "$PY" tools/preprocess_data.py --input "$DATA/shakespeare.jsonl" \
    --output-prefix "$PREFIX" --tokenizer-type SentencePieceTokenizer --tokenizer-model "$PREFIX.model" \
    --workers 2 --append-eod

"$PY" -m torch.distributed.run --nproc-per-node "$NPROC" examples/pretrain_gpt.py \
    --data-path "$PREFIX" --split 969,30,1 \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$PREFIX.model" \
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
    --max-position-embeddings 128 --normalization RMSNorm --swiglu --position-embedding-type rope \
    --disable-bias-linear --hidden-dropout 0 --attention-dropout 0 \
    --micro-batch-size 4 --global-batch-size 32 --train-iters 300 \
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.1 --clip-grad 1.0 \
    --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --ddp-bucket-size 20000 \
    --local-sgd edit --local-sgd-workers 4 --local-sgd-sync-interval 16 --local-sgd-warmup-iters 20 \
    --log-interval 10 --eval-interval 100 --eval-iters 10 --seed 1234 "$@"
