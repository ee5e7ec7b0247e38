#!/usr/bin/env python
"""Conversion speed and peak memory of tools/convert_checkpoint.py on a ~1.3 B parameter Qwen3-MoE.

    python benchmarks/bench_convert.py --workdir /tmp/bench_convert [--layers 24] [--keep]

Writes a random bf16 Qwen3-MoE checkpoint with safetensors, a few layers per shard (never the
whole model in memory), then runs ``hf-to-mcore`` and ``mcore-to-hf`` as separate processes and
reports wall time, throughput and each process's peak RSS (``wait4`` rusage high-water mark)
against the model size and the largest layer. Results are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def qwen3_moe_config(layers: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 32768,
        "hidden_size": 1024,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "intermediate_size": 3072,
        "moe_intermediate_size": 512,
        "num_experts": 32,
        "num_experts_per_tok": 4,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }


def layer_tensors(cfg: dict, i: int) -> dict[str, torch.Tensor]:
    h, d = cfg["hidden_size"], cfg["head_dim"]
    q, kv, f = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d, cfg["moe_intermediate_size"]
    p = f"model.layers.{i}."
    shapes = {
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "self_attn.q_norm.weight": (d,),
        p + "self_attn.k_norm.weight": (d,),
        p + "mlp.gate.weight": (cfg["num_experts"], h),
    }
    for e in range(cfg["num_experts"]):
        shapes[f"{p}mlp.experts.{e}.gate_proj.weight"] = (f, h)
        shapes[f"{p}mlp.experts.{e}.up_proj.weight"] = (f, h)
        shapes[f"{p}mlp.experts.{e}.down_proj.weight"] = (h, f)
    return {n: (torch.randn(s) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}


def write_model(cfg: dict, out: Path, layers_per_shard: int = 4) -> int:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    groups = [["embed"]] + [list(range(i, min(i + layers_per_shard, cfg["num_hidden_layers"])))
                            for i in range(0, cfg["num_hidden_layers"], layers_per_shard)] + [["final"]]
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        tensors = {}
        for item in group:
            if item == "embed":
                tensors["model.embed_tokens.weight"] = (torch.randn(v, h) * 0.02).to(torch.bfloat16)
            elif item == "final":
                tensors["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
                tensors["lm_head.weight"] = (torch.randn(v, h) * 0.02).to(torch.bfloat16)
            else:
                tensors.update(layer_tensors(cfg, item))
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


def run(args: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one conversion process."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), *args, "--no-progress"],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"conversion {args} failed with status {status}")
    return time.time() - t0, usage.ru_maxrss * 1024  # ru_maxrss is KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/bench_convert")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    work = Path(args.workdir)
    cfg = qwen3_moe_config(args.layers)
    if args.generate_only:
        write_model(cfg, work / "hf")
        return
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    # A child process generates the model: Linux carries ru_maxrss across fork+exec, so a
    # parent that had held the generated tensors would inflate every measured child's peak.
    subprocess.run([sys.executable, __file__, "--workdir", str(work), "--layers", str(args.layers),
                    "--generate-only"], check=True)
    size = json.loads((work / "hf" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    params = size // 2
    layer_bytes = sum(t.numel() * 2 for t in layer_tensors(cfg, 0).values())
    print(f"generated {params / 1e9:.2f} B params ({size / 1e9:.2f} GB bf16) in {time.time() - t0:.0f} s; "
          f"one layer {layer_bytes / 1e6:.0f} MB, embedding {cfg['vocab_size'] * cfg['hidden_size'] * 2 / 1e6:.0f} MB")

    idle = subprocess.run([sys.executable, "-c", "import resource, torch, sapo_megatron.checkpoint, safetensors;"
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    baseline = int(idle.stdout.strip()) * 1024
    rows = [("imports only (baseline)", None, baseline)]
    secs, rss = run(["hf-to-mcore", "--hf-dir", str(work / "hf"), "--out", str(work / "ckpt")])
    rows.append(("hf-to-mcore", secs, rss))
    secs, rss = run(["mcore-to-hf", "--ckpt", str(work / "ckpt"), "--out", str(work / "hf_back")])
    rows.append(("mcore-to-hf", secs, rss))

    print(f"\n| step | wall s | GB/s | peak RSS GB | peak RSS / model size |\n|---|---|---|---|---|")
    for name, secs, rss in rows:
        speed = f"{size / 1e9 / secs:.2f}" if secs else "-"
        wall = f"{secs:.1f}" if secs else "-"
        print(f"| {name} | {wall} | {speed} | {rss / 1e9:.2f} | {rss / size:.2f} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
