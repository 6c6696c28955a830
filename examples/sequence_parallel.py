"""Sequence-parallel dilated attention under torchrun, checked against one process.

    torchrun --standalone --nproc-per-node 2 examples/sequence_parallel.py

NCCL on GPUs (one per rank), gloo on CPUs. Every rank builds the same random sequence, keeps
its chunk, runs the layer forward and backward, and gathers the output and the key gradients;
rank 0 compares them with the single-process result.
"""

import os

import torch
import torch.distributed as dist

from dilattn import dilated_attention
from dilattn.distributed import ParallelDilatedAttention, gather_sequence, shard_sequence

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)

B, H, S, D = 1, 4, 999, 16  # S need not be a multiple of the number of ranks
segments, rates = [64, 256, 999], [1, 2, 8]  # 256 and 999 span ranks
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, H, S, D, generator=gen).to(device) for _ in range(3))

attn = ParallelDilatedAttention(segments, rates, is_causal=True)
local_q, local_k, local_v = (shard_sequence(x).requires_grad_() for x in (q, k, v))
out = attn(local_q, local_k, local_v, seq_len=S)  # this rank's rows: (B, H, ceil(S / W), D)
out.sum().backward()  # the key/value gradients come back to the ranks that own them
whole = gather_sequence(out.detach(), seq_len=S)  # (B, H, S, D)
whole_dk = gather_sequence(local_k.grad, seq_len=S)

if dist.get_rank() == 0:
    k.requires_grad_()
    ref = dilated_attention(q, k, v, segments, rates, is_causal=True)
    ref.sum().backward()
    error = max((whole - ref).abs().max().item(), (whole_dk - k.grad).abs().max().item())
    verdict = "matches the single-process result" if error < 1e-4 else "DIFFERS"
    ranks = dist.get_world_size()
    print(f"{ranks} ranks, output {tuple(whole.shape)}: max error {error:.1e}, {verdict}")
dist.destroy_process_group()
