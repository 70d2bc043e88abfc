"""Decoding compared like with like: softmax and DiJiang, eager and as compiled CUDA graphs, 1K to 64K of context."""
sections = 'decode'
lengths = '1024,8192,32768,65536'
decode_batches = '1,64'
compile = True
