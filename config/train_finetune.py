"""The released DiJiang fine-tuning recipe: lr 3e-4, block 2048, 2M-token batches, one epoch, 1000 warmup steps."""
# The released code fine-tunes with the HF Trainer: AdamW, bf16, cosine to 0, one epoch. Its batch size is
# not published: this one is Pythia's own pretraining batch, 2M tokens.
lr = 3e-4
block_size = 2048
batch_size = 2_097_152  # 2**21 tokens
micro_batch_size = 8
max_iters = 0  # one epoch of the train split
warmup = 1000
eval_interval = 500
eval_iters = 50
