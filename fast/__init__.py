"""GPU fast paths beside the readable model in dijiang.py: the fused Triton attention kernels
(triton_attention.py) and CUDA-graph decoding, optionally compiled (cuda_graph_decode.py). The model
computes the same function without them; nothing here imports it."""
