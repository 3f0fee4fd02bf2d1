"""MiniLM-L6 int8 on real labelled text: WordNet noun definitions -> lexicographer category (a linear probe, 25
classes) and example sentence -> definition retrieval, fp32 against graphopt's int8 graph and its compiled TVM
artifact. Also the cosine between fp32 and int8 embeddings.

WordNet comes from Debian's `wordnet-base` package (`apt-get download` + `dpkg -x`, no system install); give
`--wordnet DIR` to use an extracted copy (the folder that holds `data.noun`). Calibration definitions are disjoint
from the probe's train and test sets.

    python benchmarks/wordnet_probe.py --train 3000 --test 1500
"""
from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wordnet_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    cache = Path.home() / ".cache" / "graphopt" / "wordnet"
    found = list(cache.rglob("data.noun"))
    if found:
        return found[0].parent
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "wordnet-base"], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob("wordnet-base_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(cache)], check=True)
    return next(cache.rglob("data.noun")).parent


def noun_synsets(folder: Path) -> list[tuple[int, str, list[str]]]:
    """(lexicographer file number, definition, example sentences) per noun synset, noun.Tops (03) left out."""
    out = []
    for line in (folder / "data.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue
        head, gloss = line.split(" | ", 1)
        lex = int(head.split()[1])
        if lex == 3:
            continue
        examples = re.findall(r'"([^"]+)"', gloss)
        definition = gloss.split(";")[0].strip()
        if definition:
            out.append((lex, definition, examples))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wordnet", help="folder with WordNet's data.noun (default: download wordnet-base once)")
    ap.add_argument("--train", type=int, default=3000, help="definitions to train the probe on")
    ap.add_argument("--test", type=int, default=1500, help="definitions to test the probe on")
    ap.add_argument("--retrieval", type=int, default=500, help="synsets with an example sentence to retrieve among")
    ap.add_argument("--calib", type=int, default=64, help="calibration definitions (disjoint from the others)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/wordnet_probe.json")
    args = ap.parse_args(argv)

    from graphopt.bench import set_threads
    set_threads(args.threads)
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    torch.set_num_threads(args.threads)

    import graphopt
    from graphopt.ir.files import atomic_write_bytes
    from graphopt.zoo import minilm, tokenize

    synsets = noun_synsets(wordnet_dir(args.wordnet))
    rng = random.Random(0)
    rng.shuffle(synsets)
    with_ex = [s for s in synsets if s[2]][: args.retrieval]
    rest = [s for s in synsets if not s[2]]
    calib_defs = [d for _, d, _ in rest[: args.calib]]
    train = rest[args.calib: args.calib + args.train]
    test = rest[args.calib + args.train: args.calib + args.train + args.test]
    b, L = args.batch, args.seq_len

    def batches(texts):
        texts = list(texts) + [""] * (-len(texts) % b)  # pad the last batch; padded rows are dropped below
        return [tokenize(texts[i:i + b], seq_len=L) for i in range(0, len(texts), b)]

    model = minilm()
    g = graphopt.trace(model, batches(calib_defs[:b])[0])
    q = graphopt.optimize(g, "quantize{weights=int8}", data=batches(calib_defs))
    q_nomm = graphopt.optimize(g, "quantize{matmul=false weights=int8}", data=batches(calib_defs))
    tmp = Path(tempfile.mkdtemp(prefix="graphopt-wordnet-"))
    art = graphopt.load(graphopt.compile(graphopt.optimize(q, "fold-qdq"), "llvm", output=tmp / "int8"))
    runners = {
        "fp32 (graph)": lambda ids, m: g.run(ids, m)[0].numpy(),
        "int8 Q/DQ graph": lambda ids, m: q.run(ids, m)[0].numpy(),
        "int8 Q/DQ, float attention": lambda ids, m: q_nomm.run(ids, m)[0].numpy(),
        "int8 TVM artifact": lambda ids, m: art(ids.numpy(), m.numpy())[0],
    }
    texts = {"train": [d for _, d, _ in train], "test": [d for _, d, _ in test],
             "defs": [d for _, d, _ in with_ex], "examples": [e[0] for _, _, e in with_ex]}
    y_train = np.array([c for c, _, _ in train])
    y_test = np.array([c for c, _, _ in test])
    emb = {}
    for name, run in runners.items():
        t0 = time.perf_counter()
        emb[name] = {k: np.concatenate([run(*bt) for bt in batches(v)])[: len(v)] for k, v in texts.items()}
        print(f"[{name}] embedded in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    fp32 = "fp32 (graph)"
    probe_fp32 = LogisticRegression(max_iter=2000, C=10).fit(emb[fp32]["train"], y_train)
    rows = []
    for name, e in emb.items():
        probe = probe_fp32 if name == fp32 else LogisticRegression(max_iter=2000, C=10).fit(e["train"], y_train)
        sim = unit(e["examples"]) @ unit(e["defs"]).T
        rank = (sim > sim[np.arange(len(sim)), np.arange(len(sim))][:, None]).sum(1)
        cos = (unit(e["test"]) * unit(emb[fp32]["test"])).sum(1)
        rows.append({"variant": name, "probe_acc": float((probe.predict(e["test"]) == y_test).mean()),
                     "fp32_probe_acc": float((probe_fp32.predict(e["test"]) == y_test).mean()),
                     "retrieval_top1": float((rank == 0).mean()), "retrieval_top5": float((rank < 5).mean()),
                     "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())})
    lines = [f"{'variant':<28} {'probe acc':>9} {'fp32 probe':>10} {'retr top-1':>10} {'retr top-5':>10} "
             f"{'cos mean':>8} {'cos min':>8}   (MiniLM-L6, {len(train)} train / {len(test)} test definitions, "
             f"{len(set(y_train))} categories, {len(with_ex)} retrieval pairs, seq {L})"]
    for r in rows:
        lines.append(f"{r['variant']:<28} {r['probe_acc'] * 100:>8.1f}% {r['fp32_probe_acc'] * 100:>9.1f}% "
                     f"{r['retrieval_top1'] * 100:>9.1f}% {r['retrieval_top5'] * 100:>9.1f}% "
                     f"{r['cosine_mean']:>8.4f} {r['cosine_min']:>8.4f}")
    table = "\n".join(lines)
    print(table)
    atomic_write_bytes(args.out, json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows, "threads": args.threads,
                                             "table": table}, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
