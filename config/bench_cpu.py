"""A smoke run of every section on the CPU, in seconds: the tiny model, short lengths, fp32."""
device = 'cpu'
model = 'tiny'
vocab_size = 512
lengths = '64,128'
tokens_per_batch = 256
decode_batches = '1,4'
train_blocks = '64,128'
train_tokens = 256
dtype = 'float32'
warmup = 1
repeats = 3
