"""A test of the pipeline at toy scale (tiny model, block 32, 5-step fine-tunes), on a CPU in about a minute: its verdict is meaningless."""
out_dir = 'out-miniature-smoke'
data_dir = 'data/packages-bytes-smoke'
corpus_mb = 1.0
json_path = 'out-miniature-smoke/miniature.json'
model = 'tiny'
block_size = 32
teacher_batch = 16
finetune_batch = 4
micro_batch = 4
eval_windows = 8
teacher_steps = 20
min_steps = 1
smoke = True
preload = True
