"""torch.export archives (.pt2) import into the Graph, and are refused, before torch reads them, whenever loading
them would unpickle something or load compiled code."""
from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch

from graphopt.api import load_model
from graphopt.errors import ModelFileError


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.norm = torch.nn.LayerNorm(8)
        self.fc = torch.nn.Linear(8, 3)
        self.register_buffer("offset", torch.linspace(-1, 1, 3))

    def forward(self, x):
        y = self.norm(torch.nn.functional.gelu(self.conv(x)).transpose(1, 2)).mean(1)
        return self.fc(y) + self.offset


class Payload:
    """Unpickling it creates the file `path`: proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(2, 4, 10)
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (x,)), str(path))
    return net, x, path


def _rewrite(src, dst, edit):
    """Copy the zip src to dst, each member's bytes passed through edit(relative name, bytes) -> bytes | None."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            data = edit(rel, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)
    return dst


def _first(y):
    return y[0] if isinstance(y, (tuple, list)) else y


def _pickled(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_pt2_imports_and_matches_module(saved):
    net, x, path = saved
    g = load_model(path)
    assert any(n.op == "call_function" for n in g.gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(_first(g.gm(x)), net(x), rtol=1e-5, atol=1e-6)


def test_pickled_weight_is_refused_before_torch_reads_it(saved, tmp_path):
    _, _, path = saved
    marker = tmp_path / "unpickled"

    def edit(rel, data):
        if rel.endswith("_weights_config.json"):
            cfg = json.loads(data)
            first = sorted(cfg["config"])[0]
            cfg["config"][first]["use_pickle"] = True
            self_path = cfg["config"][first]["path_name"]
            edit.target = "data/weights/" + self_path
            return json.dumps(cfg).encode()
        return data
    evil = _rewrite(path, tmp_path / "evil.pt2", edit)
    evil = _rewrite(evil, tmp_path / "evil2.pt2",
                    lambda rel, data: _pickled(Payload(marker)) if rel == edit.target else data)
    # the crafted archive is a real attack: torch's own loader runs the payload
    try:
        torch.export.load(str(evil))
    except Exception:  # noqa: BLE001 - the weight is no tensor; torch fails after unpickling it
        pass
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ModelFileError, match="stored pickled"):
        load_model(evil)
    assert not marker.exists()


def test_sample_inputs_that_need_unpickling_are_refused(saved, tmp_path):
    _, _, path = saved
    marker = tmp_path / "unpickled"
    evil = _rewrite(path, tmp_path / "evil.pt2", lambda rel, data: _pickled(((Payload(marker),), {}))
                    if rel.startswith("data/sample_inputs/") else data)
    with pytest.raises(ModelFileError, match="sample inputs"):
        load_model(evil)
    assert not marker.exists()


def test_compiled_code_and_custom_objects_are_refused(saved, tmp_path):
    _, _, path = saved
    aoti = _rewrite(path, tmp_path / "aoti.pt2", lambda rel, data: data)
    with zipfile.ZipFile(aoti, "a") as z:
        z.writestr("net/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(ModelFileError, match="compiled code"):
        load_model(aoti)

    def obj_constant(rel, data):
        if rel.endswith("_constants_config.json"):
            return json.dumps({"config": {"obj": {"path_name": "custom_obj_0", "is_param": False,
                                                  "use_pickle": False, "tensor_meta": None}}}).encode()
        return data
    with pytest.raises(ModelFileError, match="constant 'obj'"):
        load_model(_rewrite(path, tmp_path / "obj.pt2", obj_constant))


def test_corrupt_and_foreign_archives(saved, tmp_path):
    _, _, path = saved
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        load_model(cut)
    legacy = _rewrite(path, tmp_path / "legacy.pt2", lambda rel, data: None if rel == "archive_format" else data)
    with pytest.raises(ModelFileError, match="archive_format"):
        load_model(legacy)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "missing.pt2")


def test_opt_writes_pt2_that_imports_again(tmp_path, capsys):
    """A PyTorch user's round trip: .pt2 in, pruned .pt2 out, which torch runs and graphopt reads again."""
    from conftest import cli_main
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5)).eval()
    x = torch.randn(1, 3, 8, 8)
    path, out = tmp_path / "cnn.pt2", tmp_path / "pruned.pt2"
    torch.export.save(torch.export.export(net, (x,)), str(path))
    assert cli_main("opt", str(path), "--pipeline", "prune-channels{ratio=0.5}", "-o", str(out)) == 0
    g = load_model(out)
    assert g.stats().params < load_model(path).stats().params
    torch.testing.assert_close(_first(g.gm(x)), _first(torch.export.load(str(out)).module()(x)),
                               rtol=1e-5, atol=1e-6)


def test_a_program_with_dynamic_dims_is_traced_at_chosen_shapes_and_its_onnx_export_keeps_the_batch(tmp_path,
                                                                                                      caplog):
    """dynamic_shapes= programs: the batch defaults to 1 with a warning (it had been taken at the example's 2,
    silently, and --input-shape refused), a given shape is taken, any other dynamic dim must be given; an ONNX
    export takes any batch again."""
    import logging

    import numpy as np
    import onnxruntime as ort

    from graphopt.errors import InputMismatchError
    from graphopt.targets.onnx.export import export_onnx
    torch.manual_seed(0)
    net = Net().eval()
    batch, length = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", min=3, max=64)
    path, both = tmp_path / "dyn.pt2", tmp_path / "dyn_len.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(2, 4, 10),), dynamic_shapes=({0: batch},)), str(path))
    torch.export.save(torch.export.export(net, (torch.randn(2, 4, 10),), dynamic_shapes=({0: batch, 2: length},)),
                      str(both))
    with caplog.at_level(logging.WARNING):
        g = load_model(path)
    assert "dynamic batch dim; tracing and compiling at batch 1" in caplog.text
    assert g.inputs[0].shape == (1, 4, 10) and g.meta["dynamic_batch"]["inputs"] == {"x": "batch"}
    assert load_model(path, {"x": (3, 4, 10)}).inputs[0].shape == (3, 4, 10)
    with pytest.raises(InputMismatchError, match=r"input 'x' \[s\d+, 4, s\d+\] has dynamic dims besides the batch.*"
                                                 r"--input-shape x=Nx4x<s\d+>"):
        load_model(both)
    open_ = load_model(both, {"x": (None, 4, 7)})  # (--input-shape x=Nx4x7: the batch stays open)
    assert open_.inputs[0].shape == (1, 4, 7) and open_.meta["dynamic_batch"]["inputs"] == {"x": "batch"}
    assert "dynamic_batch" not in load_model(both, {"x": (2, 4, 7)}).meta
    g7 = load_model(both, {"x": (2, 4, 7)})
    x = torch.randn(2, 4, 7)
    with torch.no_grad():
        torch.testing.assert_close(_first(g7.gm(x)), net(x), rtol=1e-5, atol=1e-6)
    for bad, msg in [({"x": (2, 5, 7)}, "dim 1 is fixed at 4"), ({"y": (1, 4, 10)}, "its inputs: 'x'")]:
        with pytest.raises(InputMismatchError, match=msg):
            load_model(both, bad)
    out = export_onnx(g, tmp_path / "dyn.onnx")
    x4 = torch.randn(4, 4, 10)
    got = ort.InferenceSession(str(out)).run(None, {"x": x4.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, net(x4).numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="has none"):  # (a fixed-shape program takes no shapes)
        static = tmp_path / "static.pt2"
        torch.export.save(torch.export.export(net, (torch.randn(2, 4, 10),)), str(static))
        load_model(static, {"x": (3, 4, 10)})
