"""Real pretrained models from the [models] extra: trace, fold, compile, and check fidelity on real inputs."""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest
import torch

import graphopt
from conftest import requires_models

pytestmark = [pytest.mark.realmodel, requires_models]


@pytest.fixture(scope="module")
def zoo():
    from graphopt import zoo as z
    return z


def test_mobilenet_v2_is_really_pretrained(zoo):
    model = zoo.mobilenet_v2()
    photos = zoo.photos()
    with torch.no_grad():
        cat = int(model(zoo.preprocess(photos["chelsea"])).argmax())
        coffee = int(model(zoo.preprocess(photos["coffee"])).argmax())
    assert 281 <= cat <= 285 and coffee == 967


def test_mobilenet_v2_fold_compile_fidelity(tmp_path, zoo):
    g = zoo.zoo_graph("mobilenet_v2")
    out = graphopt.optimize(g, "fold-bn,fold-constants,dce", verify=True)
    rec = out.meta["history"][0]
    assert rec["stats"]["folded"] == 52 and rec["verify"]["ok"]
    art = graphopt.load(graphopt.compile(out, "llvm", output=tmp_path / "mnv2"))
    inputs = zoo.eval_inputs("mobilenet_v2", n_photos=6)
    from graphopt.bench import fidelity
    f = fidelity([g.run(*b)[0].numpy() for b in inputs], [art(b[0].numpy())[0] for b in inputs])
    assert f.top1 == 1.0 and f.sqnr_db > 60


def test_efficientnet_lite0_fold_compile(tmp_path, zoo):
    g = zoo.zoo_graph("efficientnet_lite0")
    out = graphopt.optimize(g, "fold-bn,dce", verify=True)
    assert not any("batch_norm" in str(n.target) for n in out.graph.nodes)
    art = graphopt.load(graphopt.compile(out, "llvm", output=tmp_path / "eff"))
    (x,) = zoo.eval_inputs("efficientnet_lite0", n_photos=1)[0]
    np.testing.assert_allclose(art(x.numpy())[0], g.run(x)[0].numpy(), rtol=1e-3, atol=1e-3)


def test_minilm_loads_without_transformers_progress_bar(zoo, capfd):
    """Building the shipped MiniLM prints nothing (transformers' "Loading weights" bar came out in every compile
    of it) and leaves transformers' bar setting as it found it."""
    from transformers.utils import logging as hf_logging
    for enabled in (True, False):
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        capfd.readouterr()
        zoo.minilm()
        out, err = capfd.readouterr()
        assert "Loading" not in out + err and hf_logging.is_progress_bar_enabled() == enabled
    hf_logging.enable_progress_bar()


def test_minilm_compile_keeps_embeddings(tmp_path, zoo):
    g = zoo.zoo_graph("minilm")
    assert [s.name for s in g.inputs] == ["input_ids", "attention_mask"]
    out = graphopt.optimize(g, "fold-constants,dce", verify=True)
    art = graphopt.load(graphopt.compile(out, "llvm", output=tmp_path / "minilm"))
    ids, mask = zoo.tokenize(["graphopt compiles compressed networks."])
    ref = g.run(ids, mask)[0].numpy()
    emb = art(ids.numpy(), mask.numpy())[0]
    cos = float((ref * emb).sum() / np.linalg.norm(ref) / np.linalg.norm(emb))
    assert emb.shape == (1, 384) and cos > 0.9999


def test_mobilenet_v2_from_classic_onnx_export(tmp_path, zoo):
    model = zoo.mobilenet_v2()
    x = zoo.eval_inputs("mobilenet_v2", n_photos=1)[0][0]
    path = tmp_path / "mnv2.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["image"], opset_version=13)
    g = graphopt.load_onnx(path)
    with torch.no_grad():
        np.testing.assert_allclose(g.run(x)[0].numpy(), model(x).numpy(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dynamo", [False, True])
def test_minilm_from_dynamic_onnx_export(tmp_path, zoo, dynamo):
    """What a user exporting a Hugging Face encoder gets: dynamic batch and sequence dims (fixed on import with
    input_shapes, the CLI's --input-shape), GatherElements/GatherND/IsNaN from the exporters."""
    model, (ids, mask) = zoo.minilm(), zoo.tokenize(["graphopt reads exported encoders.", "a second one"], seq_len=16)
    path = tmp_path / "minilm.onnx"
    dims = {0: "batch", 1: "seq"}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            b, s = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
            torch.onnx.export(model, (ids, mask), str(path), dynamo=True, input_names=["input_ids", "attention_mask"],
                              dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}))
        else:
            torch.onnx.export(model, (ids, mask), str(path), dynamo=False, input_names=["input_ids", "attention_mask"],
                              dynamic_axes={"input_ids": dims, "attention_mask": dims}, opset_version=17)
    g = graphopt.load_model(path, {"input_ids": (2, 16), "attention_mask": (2, 16)})
    with torch.no_grad():
        np.testing.assert_allclose(g.run(ids, mask)[0].numpy(), model(ids, mask).numpy(), rtol=1e-4, atol=1e-4)


def test_minilm_int8s_onnx_export_takes_any_batch_with_the_batch_left_open(tmp_path, zoo):
    """zoo:minilm --input-shape input_ids=Nx16 --target onnx: traced and calibrated at batch 1, quantized for ORT,
    exported taking any batch (the Reshapes of its attention follow it, and the mask's per-sample GatherND); a batch
    of 3 sentences gives what each gives alone, and stays close to fp32."""
    g = zoo.zoo_graph("minilm", shapes={"input_ids": (None, 16)})
    assert g.inputs[0].shape == (1, 16) and set(g.meta["dynamic_batch"]["inputs"]) == {"input_ids", "attention_mask"}
    data = zoo.calibration_inputs("minilm", [tuple(s.shape) for s in g.inputs])
    q = graphopt.optimize(g, "quantize", data=data, target="onnx")
    art = graphopt.compile(q, "onnx", output=tmp_path / "minilm")
    ids, mask = zoo.tokenize(["graphopt exports encoders.", "any batch", "a third sentence, longer"], seq_len=16)
    model = graphopt.load(art)
    got = model(ids.numpy(), mask.numpy())[0]
    alone = np.concatenate([model(ids[i:i + 1].numpy(), mask[i:i + 1].numpy())[0] for i in range(3)])
    np.testing.assert_allclose(got, alone, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # (int8 in ORT vs fp32: 0.990-0.993 in one run; ORT's fused kernels vs the graph's: 0.99)
        want = np.concatenate([g.run(ids[i:i + 1], mask[i:i + 1])[0].numpy() for i in range(3)])
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.98, cos


@pytest.mark.parametrize("name,ratio", [("mobilenet_v2", 0.5), ("efficientnet_lite0", 0.3), ("minilm", 0.25)])
def test_prune_channels_oracle_on_real_models(zoo, name, ratio):
    """Pruned == original with removed channels zeroed where consumed, on real weights and real inputs. One ratio
    per model (both ratios ran the same code, 7-10 s each; the suite is near its 20-minute budget)."""
    from graphopt.passes.prune.prune_channels import apply_plan, plan_pruning, zero_removed_in_reference
    g = zoo.zoo_graph(name)
    if name != "minilm":
        g = graphopt.optimize(g, "fold-bn")
    work = g.clone()
    plan = plan_pruning(work, ratio)
    ref = zero_removed_in_reference(g, plan)
    apply_plan(work, plan)
    assert work.stats().macs < 0.9 * g.stats().macs
    for b in zoo.eval_inputs(name)[:2]:
        a, r = work.run(*b)[0], ref.run(*b)[0]
        assert a.shape == r.shape
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-3)
    if name == "minilm":  # whole heads went, with q/k/v/out together
        shapes = {n.meta.get("source_fqn"): tuple(work.get_param(n.target).shape) for n in work.graph.nodes
                  if n.op == "get_attr"}
        q = shapes["encoder.encoder.layer.0.attention.self.query.weight"]
        o = shapes["encoder.encoder.layer.0.attention.output.dense.weight"]
        assert q[0] % 32 == 0 and q[0] < 384 and o[1] == q[0]


def test_minilm_int8_embeddings_stay_close(zoo):
    """int8 weights + activations (min-max calibration on half the bundled sentences): embedding cosine to fp32
    >= 0.99 on the other half."""
    g = zoo.zoo_graph("minilm")
    half = len(zoo.SENTENCES) // 2
    cal = [zoo.tokenize([s]) for s in zoo.SENTENCES[:half]]
    q = graphopt.optimize(g, "quantize{calibrator=minmax}", data=cal)
    assert q.meta["history"][-1]["stats"]["weights_quantized"] == 37
    for s in zoo.SENTENCES[half:]:
        b = zoo.tokenize([s])
        cos = torch.nn.functional.cosine_similarity(g.run(*b)[0].reshape(-1), q.run(*b)[0].reshape(-1), dim=0)
        assert float(cos) >= 0.99, s


def test_cli_calibrates_zoo_models_on_shipped_photos():
    """`graphopt compile zoo:... --pipeline "...quantize..."` needs no --inputs: the CLI hands the pass crops of
    shipped photos (seeded differently from the fidelity crops)."""
    import argparse

    from graphopt.cli import _data
    data = _data(argparse.Namespace(inputs=None, model="zoo:mobilenet_v2"), None)
    assert len(data) == 20 and tuple(data[0][0].shape) == (1, 3, 224, 224)
    assert _data(argparse.Namespace(inputs=None, model="some.onnx"), None) is None


def test_zoo_models_trace_at_the_shapes_asked_and_their_data_follows(tmp_path, capsys):
    """`--input-shape` on a zoo: model traces it at that batch / image size / sequence length (it was refused:
    "input shapes apply to ONNX models"), and its shipped calibration data is made at those shapes (crops of that
    size, grouped by the batch); shapes the model cannot take are one-line errors saying what it takes."""
    from conftest import cli_main
    rc = cli_main("opt", "zoo:mobilenet_v2", "--input-shape", "image=2x3x96x96", "--pipeline", "fold-bn,quantize",
                  "-o", str(tmp_path / "q.gopt"))
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "activations_quantized=" in out.out
    g = graphopt.load_model(str(tmp_path / "q.gopt"))
    assert [list(s.shape) for s in g.inputs] == [[2, 3, 96, 96]] and g.meta["source"] == "zoo:mobilenet_v2"
    rc = cli_main("inspect", "zoo:minilm", "--input-shape", "input_ids=2x32")
    out = capsys.readouterr()
    assert rc == 0 and "input_ids: int64[2,32]" in out.out and "attention_mask: int64[2,32]" in out.out, out
    for shape, says in (("image=1x1x96x96", "takes [batch, 3, height, width] with sides from 32"),
                        ("image=1x3x16x16", "with sides from 32"), ("pixels=1x3x96x96", "has no input 'pixels'")):
        assert cli_main("inspect", "zoo:mobilenet_v2", "--input-shape", shape) == 1
        assert says in capsys.readouterr().err, shape
    assert cli_main("inspect", "zoo:minilm", "--input-shape", "input_ids=1x600") == 1
    assert "1-512 tokens" in capsys.readouterr().err
    assert cli_main("inspect", "zoo:minilm", "--input-shape", "input_ids=1x32", "--input-shape",
                    "attention_mask=1x64") == 1
    assert "take one shape [batch, tokens]" in capsys.readouterr().err
