"""CLI: `fluidbench bench`: training and sampling speed of the four variants -> results/bench/bench.json."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

TRAIN_COLUMNS = ["variant", "params", "img/s", "tok/s", "outside fwd+bwd", "peak MiB"]
SAMPLE_COLUMNS = ["variant", "s/img guided (cpu s)", "at paper head steps (est)", "s/img unguided (cpu s)",
                  "passes/img guided, unguided", "text/backbone/head/decode %"]


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def _seconds(m: dict) -> str:
    """Wall seconds per image, and the process's CPU seconds in brackets where measured (CPU runs)."""
    cpu = m.get("cpu_seconds_per_image")
    return _fmt(m["seconds_per_image"]) + ("" if cpu is None else f" ({_fmt(cpu)})")


def train_rows(doc: dict, setting: str) -> tuple[list[str], list[list[str]]]:
    """Training columns and one row of strings per variant of `setting`."""
    cuda = doc["machine"]["device"].startswith("cuda")
    rows = []
    for r in (r for r in doc["results"] if r["setting"] == setting):
        t = r["train"]
        row = [r["variant"], f"{r['params']['total'] / 1e6:.2f}M", _fmt(t["images_per_s"]), _fmt(t["tokens_per_s"]),
               f"{100 * t['outside_forward_backward']:.1f}%", _fmt(t["peak_memory_mib"], 4)]
        rows.append(row + ([_fmt(t["achieved_tflops"]), _fmt(t["mfu"])] if cuda else []))
    return TRAIN_COLUMNS + (["TFLOP/s", "MFU"] if cuda else []), rows


def sample_rows(doc: dict, setting: str) -> tuple[list[str], list[list[str]]]:
    """Sampling columns and one row of strings per variant of `setting`."""
    rows = []
    for r in (r for r in doc["results"] if r["setting"] == setting):
        g, u = r["sample"]["guided"], r["sample"]["unguided"]
        s = g["split"]
        passes = ", ".join(f"{m['counted']['forward_passes_per_image']}{'' if m['counts_match'] else ' MISMATCH'}"
                          for m in (g, u))
        split = "/".join(f"{100 * x:.0f}" for x in (s["text_encoder"] + s["text_aligner"], s["backbone"], s["head"],
                                                    s["tokenizer_decode"]))
        rows.append([r["variant"], _seconds(g), _fmt(g.get("seconds_per_image_at_paper_head_steps_est")),
                     _seconds(u), passes, split])
    return SAMPLE_COLUMNS, rows


def _tables(doc: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    for setting in doc["config"]["settings"]:
        caption = _caption(doc, setting)
        out.append((f"{caption}: training", *train_rows(doc, setting["name"])))
        out.append((f"{caption}: sampling per image", *sample_rows(doc, setting["name"])))
    return out


def _caption(doc: dict, setting: dict) -> str:
    hs = setting["head_steps"] if setting["head_steps"] is not None else "paper"
    return (f"{setting['name']}: {setting['ladder']} {setting['size']}, {setting['seq_len']} tokens; train batch "
            f"{setting['train_batch']}, sampling batch {setting['sample_batch']}, head steps {hs}")


def summary_lines(doc: dict) -> list[str]:
    m, lines = doc["machine"], []
    for kv in doc["kv_cache"]:
        lines.append(f"KV cache ({kv['setting']}, {kv['variant']}, batch {kv['batch_size']}, guided): "
                     f"{_fmt(kv['speedup_cpu_time'])}x faster than full recomputation in CPU time, "
                     f"{_fmt(kv['speedup'])}x in wall time (backbone alone {_fmt(kv['backbone_speedup'])}x)")
    for name, t in doc["targets"].items():
        value = t.get("value", t.get("max"))
        extra = f" {len(t['mismatches'])} mismatches of {t['checked']}" if "mismatches" in t else f" {_fmt(value)}"
        lines.append(f"target {name}: {'ok' if t['ok'] else 'FAILED'}{extra}")
    if doc["config"].get("quick"):
        lines.append("quick run: tiny batches and the smallest rung; the targets are meant for the default settings")
    lines.append(f"machine: {m.get('gpu') or m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, "
                 f"{m['threads']} threads, load average {m['loadavg_start']} -> {m['loadavg_end']}; "
                 f"bench took {doc['wall_s']:.0f} s")
    return lines


def markdown(doc: dict) -> str:
    """The tables as Markdown (docs/benchmarks.md)."""
    out = []
    for title, cols, rows in _tables(doc):
        out += [f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    return "\n".join(out + [f"- {line}" for line in summary_lines(doc)]) + "\n"


def render(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for title, cols, rows in _tables(doc):
        table = Table(title=title)
        for col in cols:
            table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=col == "variant")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for line in summary_lines(doc):
        console.print(line, markup=False)


def _command(ctx: typer.Context) -> str:
    """The command line as typed (options given on it, in declaration order), for bench.json."""
    parts = ["fluidbench", "bench"]
    for p in ctx.command.params:
        source = ctx.get_parameter_source(p.name)  # typer vendors click: compare by name
        if source is not None and source.name == "COMMANDLINE":
            parts += [p.opts[0]] if getattr(p, "is_flag", False) else [p.opts[0], str(ctx.params[p.name])]
    return " ".join(parts)


def bench(
    ctx: typer.Context,
    size: str = typer.Option("cpu-s", "--size", help="Ladder rung to measure (at 64 and at 256 tokens)."),
    ladder: str = typer.Option("cpu", "--ladder", help="cpu | paper"),
    quick: bool = typer.Option(False, "--quick", help="Smoke run: smallest rung, tiny batches, one repetition."),
    out: Path = typer.Option(Path("results/bench"), "--out", help="Folder for bench.json."),
    reps: Optional[int] = typer.Option(None, "--reps", min=1, help="Timed repetitions per measurement."),
    threads: Optional[int] = typer.Option(None, "--threads", min=0,
                                          help="torch threads (default: 1 on CPU, torch's on CUDA; 0: torch's)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 autocast on CUDA) | fp32 | bf16"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile each block."),
    head_steps: Optional[int] = typer.Option(None, "--head-steps", min=1,
                                             help="Diffusion head steps while timing (5 on CPU, 100 on CUDA)."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="Device peak for MFU (default: table)."),
    tokens: str = typer.Option("64,256", "--tokens", help="Which settings: 64, 256 or both."),
    text_encoder: str = typer.Option("minilm", "--text-encoder", help="minilm | random (no text-encoder cost)."),
    as_markdown: bool = typer.Option(False, "--markdown", help="Also print the tables as Markdown."),
    anchor_configs: bool = typer.Option(False, "--anchor-configs", help="Instead: ours against MAR and LlamaGen "
                                        "at their shared configuration, interleaved (harness/anchors.py); "
                                        "writes anchors.json."),
    mar_root: Optional[Path] = typer.Option(None, "--mar-root", help="A checkout of github.com/LTH14/mar."),
    llamagen_root: Optional[Path] = typer.Option(None, "--llamagen-root",
                                                 help="A checkout of github.com/FoundationVision/LlamaGen."),
) -> None:
    """Measure training throughput and sampling cost of the four variants; print a table, write bench.json."""
    import torch

    if anchor_configs:
        return _anchors(ctx, out, mar_root, llamagen_root, threads=1 if threads is None else threads, reps=reps or 3)
    if mar_root or llamagen_root:
        from harness.errors import FluidbenchError
        raise FluidbenchError("--mar-root/--llamagen-root: only with --anchor-configs")

    from harness.bench import bench_config, run_bench, write_bench
    from harness.errors import FluidbenchError
    from variants.registry import find_rung

    try:
        find_rung(size if not (quick and ladder == "cpu") else "cpu-xs", ladder)
    except ValueError as e:
        raise FluidbenchError(f"--size/--ladder: {e}") from None
    if dtype not in ("auto", "fp32", "bf16"):
        raise FluidbenchError(f"--dtype {dtype!r}: choose auto, fp32 or bf16")
    if device not in ("auto", "cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise FluidbenchError(f"--device {device!r}: choose auto, cpu or cuda (cuda needs a GPU)")
    wanted = {t.strip() for t in tokens.split(",") if t.strip()}
    if not wanted or not wanted <= {"64", "256"}:
        raise FluidbenchError(f"--tokens {tokens!r}: choose 64, 256 or 64,256")
    if text_encoder not in ("minilm", "random"):
        raise FluidbenchError(f"--text-encoder {text_encoder!r}: choose minilm or random")
    overrides = dict(dtype=dtype, compile=compile_, peak_tflops=peak_tflops, text_encoder=text_encoder)
    overrides |= {k: v for k, v in dict(reps=reps, threads=threads).items() if v is not None}
    cfg = bench_config(size, ladder=ladder, quick=quick, device=device, head_steps=head_steps, **overrides)
    cfg.settings = [s for s in cfg.settings if str(s.seq_len) in wanted]
    doc = run_bench(cfg)
    doc["command"] = _command(ctx)
    path = write_bench(doc, out)
    render(doc)
    if as_markdown:
        typer.echo(markdown(doc))
    typer.echo(f"wrote {path}")


def _anchors(ctx: typer.Context, out: Path, mar_root: Path | None, llamagen_root: Path | None, *, threads: int,
             reps: int) -> None:
    import torch

    from harness.anchors import anchor_lines, run_anchors
    from harness.atomic import write_json

    doc = run_anchors(mar_root, llamagen_root, threads=threads or torch.get_num_threads(), reps=reps)
    doc["command"] = _command(ctx)
    path = Path(out) / "anchors.json"
    write_json(path, doc)
    for line in anchor_lines(doc):
        typer.echo(line)
    typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
