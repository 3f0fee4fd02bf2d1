"""Tiny Hugging Face decoders (random init, built from their config classes: no downloads) returning the last
hidden state, for tests that need a whole model with transformers' KV-cache plumbing."""
from __future__ import annotations

import pytest
import torch


class _Hidden(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return self.inner(ids).last_hidden_state


def tiny_decoder(arch: str, hidden: int = 64, layers: int = 2) -> torch.nn.Module:
    """GPT-2 (Conv1D = addmm), Llama with grouped KV heads, or Falcon (new decoder architecture, x @ W.T linears,
    negative-index key heads), vocabulary 100, in eval mode; skips the test without transformers."""
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":
        m = t.GPT2Model(t.GPT2Config(vocab_size=100, n_embd=hidden, n_layer=layers, n_head=4, bos_token_id=0,
                                     eos_token_id=0))
    elif arch == "llama":
        m = t.LlamaModel(t.LlamaConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers,
                                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden))
    else:
        m = t.FalconModel(t.FalconConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2))
    return _Hidden(m.eval()).eval()
