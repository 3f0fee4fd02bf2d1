"""prune-channels over public architectures: Hugging Face models built from their config classes (random init, small
widths; no downloads), each pruned at `--ratio` and checked against the oracle (the pruned graph equals the original
with the removed channels zeroed where consumed, every output shape kept). Prints a table and writes JSON: units
removed, groups pinned (and the most common reason), parameters before and after, oracle max error.

    python benchmarks/prune_architectures.py [--ratio 0.3] [NAME ...]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="architectures to run (default: all)")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--out", default="benchmarks/results/prune_architectures.json")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch
    import transformers as T
    from torch import nn

    import graphopt
    from graphopt.ir.files import atomic_write_bytes
    from graphopt.passes.prune.prune_channels import apply_plan, plan_pruning, zero_removed_in_reference
    torch.set_num_threads(2)

    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *x):
            out = self.m(*x)
            return out["last_hidden_state"] if hasattr(out, "keys") else out[0]

    def img(c=3, s=64):
        return (torch.randn(1, c, s, s),)

    def ids(n=16, v=100):
        return (torch.randint(0, v, (1, n)),)

    cases = {
     "resnet": lambda: (T.ResNetModel(T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1])), img()),
     "convnext": lambda: (T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1])), img()),
     "vit": lambda: (T.ViTModel(T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8)), img(3, 32)),
     "bert": lambda: (T.BertModel(T.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)), ids()),
     "gpt2": lambda: (T.GPT2Model(T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4)), ids()),
     "llama_gqa": lambda: (T.LlamaModel(T.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)), ids()),
     "mobilevit": lambda: (T.MobileViTModel(T.MobileViTConfig(image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[16, 16, 24, 24, 48, 64, 80])), img()),
     "swin": lambda: (T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)), img(3, 32)),
     "efficientnet": lambda: (T.EfficientNetModel(T.EfficientNetConfig(image_size=64, width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320)), img()),
     "albert": lambda: (T.AlbertModel(T.AlbertConfig(vocab_size=100, embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)), ids()),
     "wav2vec2": lambda: (T.Wav2Vec2Model(T.Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, conv_dim=(32, 32, 32), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)), (torch.randn(1, 4000),)),
     "whisper_enc": lambda: (T.WhisperModel(T.WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=50, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).encoder, (torch.randn(1, 16, 100),)),
     "clip_vision": lambda: (T.CLIPVisionModel(T.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)), img(3, 32)),
     "squeezebert": lambda: (T.SqueezeBertModel(T.SqueezeBertConfig(vocab_size=100, hidden_size=64, embedding_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2, intermediate_groups=4, output_groups=4)), ids()),
     "levit": lambda: (T.LevitModel(T.LevitConfig(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4], depths=[1, 1, 1], key_dim=[8, 8, 8])), img()),
     "poolformer": lambda: (T.PoolFormerModel(T.PoolFormerConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])), img()),
     "mobilenetv1": lambda: (T.MobileNetV1Model(T.MobileNetV1Config(image_size=64, depth_multiplier=0.25)), img()),
     "opt": lambda: (T.OPTModel(T.OPTConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64)), ids()),
     "qwen2": lambda: (T.Qwen2Model(T.Qwen2Config(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)), ids()),
     "gemma": lambda: (T.GemmaModel(T.GemmaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, intermediate_size=128, head_dim=16)), ids()),
     "bloom": lambda: (T.BloomModel(T.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4)), ids()),
     "phi": lambda: (T.PhiModel(T.PhiConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)), ids()),
     "bart_enc": lambda: (T.BartModel(T.BartConfig(vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)).encoder, ids()),
     "bit": lambda: (T.BitModel(T.BitConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_groups=4)), img()),
     "beit": lambda: (T.BeitModel(T.BeitConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8, use_relative_position_bias=True)), img(3, 32)),
     "deit": lambda: (T.DeiTModel(T.DeiTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8)), img(3, 32)),
     "convnextv2": lambda: (T.ConvNextV2Model(T.ConvNextV2Config(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])), img()),
     "pvt_v2": lambda: (T.PvtV2Model(T.PvtV2Config(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 2, 4], image_size=64)), img()),
     "swiftformer": lambda: (T.SwiftFormerModel(T.SwiftFormerConfig(embed_dims=[16, 32, 48, 64], depths=[1, 1, 1, 1])), img()),
     "mobilevitv2": lambda: (T.MobileViTV2Model(T.MobileViTV2Config(image_size=64, width_multiplier=0.5)), img()),
     "focalnet": lambda: (T.FocalNetModel(T.FocalNetConfig(embed_dim=16, depths=[1, 1], image_size=32, patch_size=4)), img(3, 32)),
     "roberta": lambda: (T.RobertaModel(T.RobertaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, pad_token_id=1)), ids()),
     "deberta_v2": lambda: (T.DebertaV2Model(T.DebertaV2Config(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)), ids()),
     "electra": lambda: (T.ElectraModel(T.ElectraConfig(vocab_size=100, embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)), ids()),
     "mpnet": lambda: (T.MPNetModel(T.MPNetConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)), ids()),
     "gpt_neo": lambda: (T.GPTNeoModel(T.GPTNeoConfig(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8, intermediate_size=128)), ids()),
     "gptj": lambda: (T.GPTJModel(T.GPTJConfig(vocab_size=100, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)), ids()),
     "falcon": lambda: (T.FalconModel(T.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2)), ids()),
     "stablelm": lambda: (T.StableLmModel(T.StableLmConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)), ids()),
     "olmo": lambda: (T.OlmoModel(T.OlmoConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)), ids()),
     "hubert": lambda: (T.HubertModel(T.HubertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, conv_dim=(32, 32, 32), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)), (torch.randn(1, 4000),)),
     "mamba": lambda: (T.MambaModel(T.MambaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2)), ids()),
     "hiera": lambda: (T.HieraModel(T.HieraConfig(embed_dim=16, image_size=[64, 64], patch_size=[7, 7], patch_stride=[4, 4], patch_padding=[3, 3], depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], query_stride=[2, 2], masked_unit_size=[8, 8])), img()),
     "dinov2_reg": lambda: (T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)), img(3, 32)),
     "gemma2": lambda: (T.Gemma2Model(T.Gemma2Config(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, head_dim=16)), ids()),
     "phi3": lambda: (T.Phi3Model(T.Phi3Config(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)), ids()),
     "convbert": lambda: (T.ConvBertModel(T.ConvBertConfig(vocab_size=100, hidden_size=64, embedding_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)), ids()),
     "mobilenetv2": lambda: (T.MobileNetV2Model(T.MobileNetV2Config(image_size=64, depth_multiplier=0.35)), img()),
     "regnet": lambda: (T.RegNetModel(T.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], groups_width=8)), img()),
     "t5enc": lambda: (T.T5EncoderModel(T.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)), ids()),
     "distilbert": lambda: (T.DistilBertModel(T.DistilBertConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128)), ids()),
     "mistral": lambda: (T.MistralModel(T.MistralConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)), ids()),
     "dinov2": lambda: (T.Dinov2Model(T.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)), img(3, 32)),
     "segformer": lambda: (T.SegformerModel(T.SegformerConfig(hidden_sizes=[16, 32, 48, 64], num_encoder_blocks=4, depths=[1,1,1,1], decoder_hidden_size=32)), img()),
    }
    rows = []
    for name in args.names or list(cases):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        row = {"model": name}
        try:
            m, x = cases[name]()
            g = graphopt.trace(Wrap(m.eval()), x)
            work = g.clone()
            plan = plan_pruning(work, args.ratio, "l2", "local")
            ref = zero_removed_in_reference(g, plan)
            apply_plan(work, plan)
            err = max(float((a - b).abs().max()) for a, b in zip(work.run(*x), ref.run(*x)))
            shapes_ok = all(tuple(a.shape) == s.shape for a, s in zip(work.run(*x), g.outputs))
            pins = Counter(re.sub(r"'[^']*'", "'.'", gr.pinned) for gr in plan.groups if gr.pinned)
            row.update(removed=sum(len(u) for u in plan.remove.values()), groups=len(plan.groups),
                       pinned=sum(pins.values()), top_pin=pins.most_common(1)[0][0] if pins else "",
                       params_before=g.stats().params, params_after=work.stats().params, oracle_max_err=err,
                       ok=bool(err < 1e-3 and shapes_ok))
        except Exception as e:  # noqa: BLE001 - a crash is a result here, reported in the table
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"  {name}: {'ok' if row['ok'] else 'FAIL'}", file=sys.stderr, flush=True)
    lines = [f"{'model':<16} {'oracle':<6} {'removed':>7} {'pinned':>9} {'params':>17}  most common pin reason"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<16} {'CRASH':<6} {r['error']}")
            continue
        lines.append(f"{r['model']:<16} {'ok' if r['ok'] else 'WRONG':<6} {r['removed']:>7} "
                     f"{r['pinned']:>4}/{r['groups']:<4} {r['params_before']:>8}->{r['params_after']:<8}  {r['top_pin']}")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, json.dumps({"ratio": args.ratio, "date": time.strftime("%Y-%m-%d"),
                                             "transformers": T.__version__, "rows": rows, "table": table},
                                            indent=1).encode())
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
