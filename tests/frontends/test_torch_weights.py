"""Weights files are loaded with weights_only=True: pickled objects are refused with a clear error."""
from __future__ import annotations

import pickle

import pytest
import torch

from graphopt.errors import ModelFileError
from graphopt.frontends.torch_export import load_weights


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_state_dict_loads(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.ones(2)}, path)
    assert torch.equal(load_weights(path)["a"], torch.ones(2))


def test_pickle_payload_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"a": torch.ones(2), "x": Payload()}, path)
    with pytest.raises(ModelFileError, match="refuses to unpickle"):
        load_weights(path)
    assert "this must never run" not in capsys.readouterr().out


def test_plain_pickle_and_garbage_refused(tmp_path):
    (tmp_path / "p.pth").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelFileError):
        load_weights(tmp_path / "p.pth")
    (tmp_path / "g.pth").write_bytes(b"garbage")
    with pytest.raises(ModelFileError):
        load_weights(tmp_path / "g.pth")


def test_pth_is_not_a_model_file(tmp_path):
    import graphopt
    path = tmp_path / "w.pth"
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(ModelFileError, match="never unpickles"):
        graphopt.load_model(path)
