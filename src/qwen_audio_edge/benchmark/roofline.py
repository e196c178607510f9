"""Decode roofline: bytes each engine must read per generated token, against the memory bandwidth.

Batch-1 decode is memory-bound: every weight is read once per token (the embedding table only one row),
plus the KV cache up to the current position. Bytes are summed from the tensors actually loaded (our W4
tensors with their scales/zeros as the kernels hold them; the baseline's dense parameters), the KV part at
the mean position of the timed answer. achieved GB/s = bytes/token × tokens/s; the ceiling is the
measured bandwidth (system.measured_bandwidth_gbps) and, on GPUs, the data-sheet peak.
"""

from __future__ import annotations

import torch

from .system import device_info, gpu_peak_gbps, measured_bandwidth_gbps


def roofline(ours, baselines: dict, results, cfg) -> dict:
    p = ours.p
    text = p.artifacts.text_config
    hidden, vocab = int(text["hidden_size"]), int(text["vocab_size"])
    kv_ours = p.decoder.args.kv_bytes_per_token(p.dtype, p.decoder.kv_storage)  # int8 KV: with its scales
    heads_kv = int(text.get("num_key_value_heads") or text["num_attention_heads"])
    head_dim = hidden // int(text["num_attention_heads"])
    secs, n = cfg.seconds[0], max(cfg.new_tokens)
    rows = []
    emb_ours = ours.embedding_bytes()
    weights_ours = ours.weight_bytes() - emb_ours + emb_ours // vocab
    for engine in ["ours", *baselines]:
        tok_s = results.median(engine, "decode", secs, n)
        if tok_s is None:
            continue
        position = results.prompt_tokens[secs] + n / 2
        if engine == "ours":
            weights, kv = weights_ours, kv_ours
        else:
            hf = baselines[engine]
            elt = torch.empty((), dtype=hf.model.dtype).element_size()
            weights = hf.weight_bytes() - vocab * hidden * elt + hidden * elt
            kv = 2 * int(text["num_hidden_layers"]) * heads_kv * head_dim * elt
        per_token = weights + kv * position
        rows.append(
            {
                "engine": engine,
                "audio_s": secs,
                "new_tokens": n,
                "weight_bytes_per_token": int(weights),
                "kv_bytes_per_token_at_mean_position": int(kv * position),
                "bytes_per_token": int(per_token),
                "tok_s": tok_s,
                "achieved_gbps": round(per_token * tok_s / 1e9, 2),
            }
        )
    measured = measured_bandwidth_gbps(cfg.device)
    info = device_info(cfg.device)
    peak = gpu_peak_gbps(info["gpu"]) if "gpu" in info else None
    for r in rows:
        r["percent_of_measured"] = round(100 * r["achieved_gbps"] / measured["gbps"], 1)
        r["percent_of_peak"] = round(100 * r["achieved_gbps"] / peak, 1) if peak else None
    return {"measured": measured, "datasheet_peak_gbps": peak, "kv_bytes_per_token": kv_ours, "rows": rows}
