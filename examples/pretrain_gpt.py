"""Megatron-style GPT pretraining with optional local SGD (thin entry; the logic is in
megatron_edit/training/pretrain_gpt.py). Launch with torchrun, e.g.

    torchrun --nproc-per-node 4 examples/pretrain_gpt.py --mock-data --tokenizer-type NullTokenizer \
        --vocab-size 128 --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 \
        --micro-batch-size 2 --global-batch-size 16 --train-iters 20 --lr 1e-3 \
        --local-sgd edit --local-sgd-workers 2 --local-sgd-sync-interval 4 \
        --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
"""
from megatron_edit.training.pretrain_gpt import main

if __name__ == "__main__":  # spawn-safe (dist_checkpointing starts processes)
    main()
