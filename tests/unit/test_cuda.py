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


def test_cuda_engine_with_chunks_matches_cpu() -> None:
    import random

    from stream_rnn.engine.engine import Engine
    from stream_rnn.engine.events import TOKEN, Event
    from stream_rnn.registry.checkpoint import Manifest
    from stream_rnn.train.vocab import Vocab

    torch.manual_seed(0)
    vocab = Vocab.from_tokens([f"t{i}" for i in range(40)], "token")
    cfg = ModelConfig(task="next-token", cell="gru", vocab_size=len(vocab), hidden_size=32)
    manifest = Manifest(
        model_config=cfg.to_dict(), vocab=vocab.to_dict(), weights_sha256="0" * 64, version="c"
    )
    cpu_model = RecurrentModel(cfg).eval()
    gpu_model = RecurrentModel(cfg).eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    engines = [Engine(cpu_model, manifest), Engine(gpu_model.to("cuda"), manifest)]
    rng = random.Random(0)
    events = [
        Event(f"k{rng.randrange(50)}", TOKEN, -1, f"0:{i}", None, None, 0, i,
              [rng.randrange(4, len(vocab)) for _ in range(rng.randint(1, 16))])
        for i in range(400)
    ]  # fmt: skip
    cpu, gpu = (e.process(events).predictions for e in engines)
    for a, b in zip(cpu, gpu, strict=True):
        assert (a["id"], a["pos"], a["pos_to"]) == (b["id"], b["pos"], b["pos_to"])
        for x, y in zip(a["next"], b["next"], strict=True):
            assert max(abs(p - q) for p, q in zip(x["probs"], y["probs"], strict=True)) <= 1e-5
