"""The printed table of benchmarks/speed.py: sections from the measured results, targets judged.

``judge_*`` turn the best rounds into a section dict (the JSON written by --json); ``format_report``
turns the whole report into text. Nothing here measures.
"""

from __future__ import annotations

PEER = "transformers+peft"


def _target(value: float, goal: float, at_least: bool, shown: str) -> dict:
    met = value >= goal if at_least else value <= goal
    return {"value": value, "goal": goal, "target": shown, "met": bool(met)}


def judge_a(lorakit: dict, peer: dict, targets: dict) -> dict:
    ratio = lorakit["tokens_per_s"] / peer["tokens_per_s"]
    return {"lorakit": lorakit, "peer": peer, "tokens_per_s_ratio": ratio,
            "targets": {"tokens_per_s_ratio": _target(ratio, targets["a_ratio"], True, f">= {targets['a_ratio']}x"),
                        "roofline": _target(lorakit["roofline"], targets["a_roofline"], True,
                                            f">= {targets['a_roofline']:.0%}")}}


def judge_b(lorakit_bf16: dict, peer_bf16: dict, peer_fp32: dict, targets: dict) -> dict:
    ratio = lorakit_bf16["tokens_per_s"] / peer_fp32["tokens_per_s"]
    # The target is judged on held-out real text: on random tokens the loss is ~13-14 nats, where
    # bf16 rounding alone moves it by ~0.1, so that figure says nothing about training quality.
    text = [s.get("heldout_text_loss") for s in (lorakit_bf16, peer_fp32)]
    text_diff = None if None in text else text[0] - text[1]
    diff = text_diff if text_diff is not None else lorakit_bf16["heldout_loss"] - peer_fp32["heldout_loss"]
    return {"lorakit_bf16": lorakit_bf16, "peer_bf16": peer_bf16, "peer_fp32": peer_fp32,
            "heldout_text_diff_vs_peer_fp32": text_diff,
            "heldout_random_diff_vs_peer_fp32": lorakit_bf16["heldout_loss"] - peer_fp32["heldout_loss"],
            "ratio_vs_peer_bf16": lorakit_bf16["tokens_per_s"] / peer_bf16["tokens_per_s"],
            "ratio_vs_peer_fp32": ratio, "heldout_diff_vs_peer_fp32": diff,
            "targets": {"tokens_per_s_vs_peer_fp32": _target(ratio, targets["b_ratio"], True,
                                                             f">= {targets['b_ratio']}x"),
                        "heldout_loss_diff": _target(abs(diff), targets["b_loss"], False,
                                                     f"|diff| <= {targets['b_loss']}")}}


def judge_c(real: dict, targets: dict) -> dict:
    ours, theirs = real["lorakit"], real["peer"]
    wall, rss = ours["wall_s"] / theirs["wall_s"], ours["peak_rss_mib"] / theirs["peak_rss_mib"]
    diff = ours["heldout_loss"] - theirs["heldout_loss"]
    return {**real, "wall_ratio": wall, "rss_ratio": rss, "heldout_diff": diff,
            "targets": {"wall_ratio": _target(wall, targets["c_wall"], False, f"<= {targets['c_wall']}x"),
                        "heldout_diff": _target(diff, targets["c_loss"], False, f"<= peer + {targets['c_loss']}"),
                        "rss_ratio": _target(rss, targets["c_rss"], False, f"<= {targets['c_rss']}x")}}


# --- text -------------------------------------------------------------------------------------------

def _grid(rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Columns padded to their widest cell; the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(widths[i + 1]) for i, cell in enumerate(row[1:])]
        lines.append((indent + "   ".join(cells)).rstrip())
    return lines


def _verdict(target: dict) -> list[str]:
    return [target["target"], "met" if target["met"] else "NOT MET"]


def _dtypes(result: dict) -> str:
    return f"{result['dtypes']['base']} / {result['dtypes']['adapters']}"


def _flops_line(result: dict, batch: int, seq: int, precision: str) -> str:
    return (f"  useful FLOPs per step = 4 x P x N + 6 x B x h x T^2 x d x L = 4 x {result['base_params'] / 1e6:.1f}M "
            f"x {batch * seq} tokens ({result['dense_gflop']:.1f} GFLOP) + attention with B={batch}, "
            f"h={result['heads']}, T={seq}, d={result['head_dim']}, L={result['layers']} "
            f"({result['attention_gflop']:.1f} GFLOP) = "
            f"{result['useful_gflop']:.1f} GFLOP; roofline fraction = that / step s / measured {precision} matmul "
            f"peak ({result['peak_gflops']:.0f} GFLOP/s)"
            + ("; above 100% means the measured peak is too low (other load while measuring)"
               if result["roofline"] > 1 else ""))


def format_a(section: dict, options: dict) -> list[str]:
    ours, theirs, targets = section["lorakit"], section["peer"], section["targets"]
    rows = [["", "lorakit", PEER, "ratio", "target", ""],
            ["step s (median)", f"{ours['step_s']:.3f}", f"{theirs['step_s']:.3f}",
             f"{ours['step_s'] / theirs['step_s']:.2f}x"],
            ["tokens/s", f"{ours['tokens_per_s']:.1f}", f"{theirs['tokens_per_s']:.1f}",
             f"{section['tokens_per_s_ratio']:.2f}x", *_verdict(targets["tokens_per_s_ratio"])],
            ["fraction of roofline", f"{ours['roofline']:.1%}", f"{theirs['roofline']:.1%}", "",
             *_verdict(targets["roofline"])],
            ["peak RSS MiB", f"{ours['peak_rss_mib']:.0f}", f"{theirs['peak_rss_mib']:.0f}",
             f"{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x"],
            ["last-step loss", f"{ours['last_loss']:.4f}", f"{theirs['last_loss']:.4f}"],
            ["held-out loss (random batch)", f"{ours['heldout_loss']:.4f}", f"{theirs['heldout_loss']:.4f}"],
            ["held-out loss (8 real-text rows)", _num(ours.get("heldout_text_loss")),
             _num(theirs.get("heldout_text_loss"))],
            ["dtypes base / adapters", _dtypes(ours), _dtypes(theirs)]]
    return _grid(rows) + [_flops_line(ours, options["batch_size"], options["seq_len"], "fp32")]


def format_b(section: dict, options: dict) -> list[str]:
    sides = [section["lorakit_bf16"], section["peer_bf16"], section["peer_fp32"]]
    targets = section["targets"]
    rows = [["", "lorakit bf16", f"{PEER} bf16", f"{PEER} fp32"],
            ["step s (median)", *(f"{s['step_s']:.3f}" for s in sides)],
            ["tokens/s", *(f"{s['tokens_per_s']:.1f}" for s in sides)],
            ["fraction of roofline (own dtype's peak)", *(f"{s['roofline']:.1%}" for s in sides)],
            ["peak RSS MiB", *(f"{s['peak_rss_mib']:.0f}" for s in sides)],
            ["last-step loss", *(f"{s['last_loss']:.4f}" for s in sides)],
            ["held-out loss (random batch, fp32 CE)", *(f"{s['heldout_loss']:.4f}" for s in sides)],
            ["held-out loss (8 real-text rows)", *(_num(s.get("heldout_text_loss")) for s in sides)],
            ["dtypes base / adapters", *(_dtypes(s) for s in sides)]]
    checks = [["", "value", "target", ""],
              ["tokens/s lorakit bf16 / peer bf16", f"{section['ratio_vs_peer_bf16']:.2f}x"],
              ["tokens/s lorakit bf16 / peer fp32", f"{section['ratio_vs_peer_fp32']:.2f}x",
               *_verdict(targets["tokens_per_s_vs_peer_fp32"])],
              ["held-out loss lorakit bf16 - peer fp32 (real-text rows)",
               f"{section['heldout_diff_vs_peer_fp32']:+.4f}", *_verdict(targets["heldout_loss_diff"])],
              ["  the same on the random batch (information: bf16 rounding at loss ~13)",
               f"{section['heldout_random_diff_vs_peer_fp32']:+.4f}"]]
    met = all(t["met"] for t in targets.values())
    return (_grid(rows) + _grid(checks) + [f"  target (b): {'met' if met else 'NOT MET'}",
                                           _flops_line(sides[0], options["batch_size"], options["seq_len"], "bf16")])


def format_c(section: dict, options: dict) -> list[str]:
    ours, theirs, data, targets = section["lorakit"], section["peer"], section["data"], section["targets"]
    chars = data.get("answer_chars") or {}
    lines = [f"  data: Python {data['python']} stdlib docstrings as question -> answer chats, {data['train_rows']} "
             f"train / {data['eval_rows']} held-out rows (answers {chars.get('min', '?')}-{chars.get('max', '?')} "
             f"chars, median {chars.get('median', '?')}), prompts masked; {theirs['train_tokens']} train tokens, "
             f"{theirs['heldout_targets']} labelled held-out tokens"]
    rows = [["", "lorakit train", f"Trainer+peft", "ratio", "target", ""],
            ["wall s (spawn to exit)", f"{ours['wall_s']:.1f}", f"{theirs['wall_s']:.1f}",
             f"{section['wall_ratio']:.2f}x", *_verdict(targets["wall_ratio"])],
            ["held-out loss (token mean)", f"{ours['heldout_loss']:.4f}", f"{theirs['heldout_loss']:.4f}",
             f"{section['heldout_diff']:+.4f}", *_verdict(targets["heldout_diff"])],
            ["peak RSS MiB", f"{ours['peak_rss_mib']:.0f}", f"{theirs['peak_rss_mib']:.0f}",
             f"{section['rss_ratio']:.2f}x", *_verdict(targets["rss_ratio"])],
            ["of which training loop s (own clock)", _num(ours.get("train_s"), 1), _num(theirs.get("train_s"), 1)],
            ["optimizer steps", str(ours["train_steps"]), str(theirs["train_steps"])],
            ["train loss (last step / epoch mean)", _num(ours["train_loss"]), _num(theirs["train_loss"])],
            ["held-out loss before training", _num(ours.get("initial_heldout_loss")), "-"],
            ["precision / batching", f"{ours['precision']} / packing {ours['packing']}",
             "fp32 / pad to longest"]]
    met = all(t["met"] for t in targets.values())
    return lines + _grid(rows) + [
        f"  target (c): {'met' if met else 'NOT MET'}",
        "  equal data, not equal step counts: both sides see every training sample once; packing puts several "
        "samples in one row, so lorakit's epoch can have fewer optimizer steps than the peer's one per "
        f"{options['real_batch_size']} samples, and must still reach the peer's held-out loss."]


def _lr(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-")


def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(report: dict) -> str:
    head, options = report["header"], report["options"]
    real = options["real"]
    lines = ["lorakit speed benchmark: lorakit vs transformers + peft, one run, sides interleaved, each in a fresh "
             "process; best round of each side kept",
             f"host: {head['host']}",
             f"versions: {head['versions']} | {head['date']}"]
    peaks = report.get("roofline_peak")
    if peaks:
        rates = " / ".join(f"{name} {rate:.0f}" for name, rate in peaks["gflops"].items())
        lines.append(f"roofline peak, measured in this run: {rates} GFLOP/s ({peaks['n']}^3 matmul, best of "
                     f"{peaks['repeats']}, highest of {peaks['measurements']} measurements between the children)")
    lines.append("")
    a_title = (f"(a) fixed shapes, fp32: SmolLM2-135M-Instruct, LoRA r=16 alpha=32 dropout 0 on q,k,v,o,gate,up,down "
               f"of every block, batch {options['batch_size']} x {options['seq_len']} random tokens, all labelled, "
               f"AdamW lr {_lr(options['lr'])}, {options['steps']} steps (2 warm-up, median of the rest), best of "
               f"{options['fixed_repeats']} round(s)")
    titles = {"a": a_title,
              "b": "(b) bf16, same shapes: lorakit bf16 base + fp32 adapters vs peer bf16 model + peft; "
                   "targets against the peer in fp32",
              "c": (f"(c) real data, one epoch, whole process: r=16 alpha=32 on all 7 linear layers, max_seq_len "
                    f"{real['max_seq_len']}, batch {real['batch_size']}, lr {_lr(real['lr'])} linear, warmup "
                    f"{real['warmup_ratio']}, max_grad_norm 1, seed {real['seed']}; lorakit's defaults otherwise "
                    f"(packing/precision auto, group_by_length), Trainer's defaults otherwise (fp32); best of "
                    f"{options['real_repeats']} round(s)")}
    formatters = {"a": format_a, "b": format_b, "c": format_c}
    for key in "abc":
        section = report["sections"].get(key)
        if section is None:
            continue
        if "skipped" in section:
            lines += [f"({key}) skipped: {section['skipped']}", ""]
        elif "failed" in section:
            failure = "\n    ".join(section["failed"].splitlines())
            lines += [titles[key], f"  FAILED: {failure}", ""]
        else:
            lines += [titles[key], *formatters[key](section, options), ""]
    lines.append(f"total benchmark time {report['elapsed_s'] / 60:.1f} min")
    return "\n".join(lines)
