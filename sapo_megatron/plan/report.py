"""The planner's human-readable table and verdict."""

from __future__ import annotations

GB = 1e9

_ROWS = [
    ("weights", "weights (params_dtype)"),
    ("gradients", "gradients (reduce dtype)"),
    ("main_params", "fp32 main params"),
    ("adam_moments", "Adam moments"),
    ("activations_stored", "activations, stored x in flight"),
    ("recompute_block", "recomputed block (backward)"),
    ("logits_and_logprobs", "log-probs: logits + grad, or fused blocks"),
    ("routes", "replayed routes"),
]


def _gb(x: float) -> str:
    return f"{x / GB:8.2f}"


def format_report(report) -> str:
    lay, mb = report.layout, report.microbatch
    lines = [
        f"plan: {report.config}   world {report.world_size}   "
        f"TP {lay['tp']} PP {lay['pp']} CP {lay['cp']} EP {lay['ep']} ETP {lay['etp']}   "
        f"DP {lay['dp']} expert-DP {lay['expert_dp']}   SP {'on' if lay['sequence_parallel'] else 'off'}",
        f"microbatch: {mb['layout']}, {mb['rows']} x {mb['row_tokens']} tokens ({mb['sample_tokens']} per sample: "
        f"prompt {mb['prompt_tokens']} + max_new_tokens), {mb['tokens_per_rank']} per rank, "
        f"{mb['microbatches_per_step']} microbatches per step; recompute {lay['recompute']['granularity'] or 'none'}; "
        f"layer spec {lay['spec']}",
        "",
    ]
    head = f"{'GB per rank':38s}" + "".join(f"{'stage ' + str(s.stage) + ' (' + str(s.layers) + 'L)':>16s}"
                                             for s in report.stages)
    lines.append(head)
    lines.append("-" * len(head))
    lines.append(f"{'parameters (B): dense / expert':38s}" + "".join(
        f"{s.dense_params / 1e9:>8.3f}/{s.expert_params / 1e9:<7.3f}" for s in report.stages))
    for key, label in _ROWS:
        if any(s.device.get(key) for s in report.stages):
            lines.append(f"{label:38s}" + "".join(f"{_gb(s.device.get(key, 0.0)):>16s}" for s in report.stages))
    lines.append("-" * len(head))
    lines.append(f"{'peak on the GPU':38s}" + "".join(f"{_gb(s.peak_bytes):>16s}" for s in report.stages))
    host = [sum(s.host.values()) for s in report.stages]
    if any(host):
        lines.append(f"{'host memory (offloaded optimizer)':38s}" + "".join(f"{_gb(h):>16s}" for h in host))
    lines.append("")
    for note in report.notes:
        lines.append(f"note: {note}")
    if report.sglang is not None:
        sg = report.sglang
        lines.append(
            f"SGLang ({'same node' if sg.colocated else 'own nodes'}): {sg.servers} server(s) x TP {sg.tp}"
            f"{f' x DP {sg.dp}' if sg.dp > 1 else ''}: weights {sg.weights_bytes_per_gpu / GB:.1f} GB per GPU of a "
            f"{sg.pool_bytes_per_gpu / GB:.1f} GB static pool; KV {sg.kv_bytes_per_token_per_gpu / 1e3:.0f} kB per "
            f"token per GPU -> {sg.kv_tokens_capacity} tokens per replica, {sg.kv_tokens_demand} wanted at the "
            f"configured concurrency ({'fits' if sg.fits else 'DOES NOT FIT'}"
            f"{', requests queue' if sg.fits and sg.kv_tokens_demand > sg.kv_tokens_capacity else ''})")
    verdict = "FITS" if report.fits else "DOES NOT FIT"
    lines.append(
        f"verdict: {verdict}: peak {report.peak_bytes_per_rank / GB:.1f} GB of {report.gpu_memory_bytes / GB:.0f} GB "
        f"per GPU, headroom {report.headroom:.1%} (needs >= {report.to_dict()['required_headroom']:.0%})")
    return "\n".join(lines)
