"""The CUDA path: streaming step and engine on the GPU agree with the CPU (needs a GPU)."""

from __future__ import annotations

import pytest
import torch

from stream_rnn.model import ModelConfig, RecurrentModel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_cuda_step_matches_cpu(cell: str) -> None:
    from stream_rnn.model.network import exact_float32

    exact_float32()
    torch.manual_seed(0)
    cfg = ModelConfig(task="next-token", cell=cell, vocab_size=50, hidden_size=32, num_layers=2)
    cpu = RecurrentModel(cfg).eval()
    gpu = RecurrentModel(cfg).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda")
    tokens = torch.randint(4, 50, (6, 9))
    lengths = torch.tensor([9, 1, 4, 7, 2, 9])
    out_cpu, h_cpu = cpu.step(tokens, None, lengths)
    out_gpu, h_gpu = gpu.step(tokens.cuda(), None, lengths)
    for b, n in enumerate(lengths.tolist()):
        assert (out_gpu[b, :n].cpu() - out_cpu[b, :n]).abs().max() <= 1e-5
    h_c = h_cpu[0] if isinstance(h_cpu, tuple) else h_cpu
    h_g = h_gpu[0] if isinstance(h_gpu, tuple) else h_gpu
    assert (h_g.cpu() - h_c).abs().max() <= 1e-5
