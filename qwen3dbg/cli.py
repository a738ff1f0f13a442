"""The `qwen3dbg` command line. Heavy imports happen inside each command, so `--help` is instant."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.text import Text

from qwen3dbg.util.errors import UserError
from qwen3dbg.util.text import plural

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
#: Messages carry paths, tap names and errors quoting files: `console` parses no markup and no :emoji:
#: codes in them, so `[/]` or `pip install '.[llamacpp]'` prints as written. Print through `say`.
console = Console(stderr=True, markup=False, emoji=False)


def report_console() -> Console:
    """Stdout, where the reports render: they style with markup and escape what they quote; a quoted
    `:smile:` is not an emoji either."""
    return Console(emoji=False)


def _flag_type(display):
    """Help shows a flag (--help, --list-presets) bare: it takes no value, so no `<bool>` beside it."""
    return lambda self, ctx: None if self.is_flag else display(self, ctx)


typer.core.TyperOption.display_type_rich = _flag_type(typer.core.TyperOption.display_type_rich)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"qwen3dbg {version('qwen3dbg')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_version, help="Print the version and exit."
    ),
):
    """Numerical debugging and parity diffing for Qwen3 implementations: capture every intermediate
    tensor of a reference and a candidate, and find the first op where they part."""


# Options more than one command takes, declared once. Each command gives its own default
# (`dtype: Dtype = "bfloat16"`); a command whose option means something else declares its own.
Model = Annotated[
    Optional[Path],
    typer.Option(
        help="Model directory (config.json + safetensors). Default: a tiny synthetic Qwen3 made on first use."
    ),
]
TokenIds = Annotated[
    Optional[str],
    typer.Option(help="Prompt token ids, comma-separated, e.g. '5,17,99'. Default: a fixed 16-token prompt."),
]
Prompt = Annotated[
    Optional[str],
    typer.Option(help="Prompt text, tokenized with the model directory's tokenizer (real checkpoints only)."),
]
DecodeIds = Annotated[
    Optional[str], typer.Option(help="Token ids fed at the decode steps, comma-separated (forced decoding).")
]
DecodeSteps = Annotated[
    Optional[int],
    typer.Option(
        help="Number of decode steps after the prefill; their ids are the greedy picks of an fp64 run, fixed "
        "before anything runs. Default: 0 (prefill only)."
    ),
]
DTYPE_HELP = "Compute dtype: float32/fp32, bfloat16/bf16, float16/fp16 (float64/fp64 for the golden)."
Dtype = Annotated[str, typer.Option(help=DTYPE_HELP)]
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose",
        help="Let third-party warnings and banners (transformers' FutureWarnings, its LOAD REPORT) through.",
    ),
]
JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Write the whole result as JSON to this file.")]
HtmlOut = Annotated[Optional[Path], typer.Option("--html", help="Write a self-contained HTML report to this file.")]
FailOn = Annotated[str, typer.Option(help="Exit 1 when a finding is at or above this severity: warning or error.")]


def say(*parts: str | tuple[str, str]) -> None:
    """One message on stderr: strings as written, (text, style) pairs styled; long paths are not wrapped."""
    console.print(Text.assemble(*parts), highlight=False, soft_wrap=True)


@contextmanager
def progress_bar(label: str):
    """A live bar on a terminal; in a log, where the bar stays off, a heartbeat line naming `label` whenever
    nothing was printed for 5 s (util/progress.py), so long work never reads as a hang."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qwen3dbg.util.progress import Phases

    # off the terminal a transient bar would leave only a blank line behind
    bar = Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    with bar, Phases(console, label) if not console.is_terminal else nullcontext():
        yield bar


@app.command("make-model")
def make_model_cmd(
    out: Optional[Path] = typer.Argument(
        None,
        help="Directory to write config.json and safetensors into (with --format "
        "gguf: the .gguf file); not needed with --list-presets.",
        show_default=False,
    ),
    preset: str = typer.Option("tiny-dense", help="Shape preset; see --list-presets."),
    seed: int = typer.Option(0, help="Weights are a deterministic function of the seed and the tensor name."),
    dtype: str = typer.Option("bfloat16", help="On-disk dtype (released Qwen3 checkpoints are bfloat16)."),
    shard_size_mb: int = typer.Option(
        4096, min=0, help="Shard the safetensors above this size (MiB), with an index; 0: one tensor per shard."
    ),
    k_norm_peak: Optional[float] = typer.Option(None, help="Largest k_norm weight (layer 0; halves per layer)."),
    q_norm_peak: Optional[float] = typer.Option(None, help="Plant one q_norm weight of this size in every layer."),
    ghost_bias: Optional[float] = typer.Option(
        None, help="Plant q/k/v/o_proj.bias tensors of this scale that the config does not declare (e.g. 1e30)."
    ),
    nonfinite: list[str] = typer.Option([], help="Tensor name to plant a NaN and an inf into (repeatable)."),
    huge: list[str] = typer.Option([], help="Tensor name to plant values of 1e30 into (repeatable)."),
    list_presets: bool = typer.Option(False, "--list-presets", help="List the presets and exit."),
    replace: bool = typer.Option(
        False,
        "--replace",
        help="Write into a directory that is not empty: replace what make-model wrote there before (a marker file "
        "records it) and keep every other file. A file it did not write whose name it would write is never replaced.",
    ),
    format: str = typer.Option("safetensors", "--format", help="safetensors (a model directory) or gguf (one file)."),
    gguf_type: str = typer.Option(
        "f16", help="--format gguf only: f32, f16, bf16 or q8_0 (norms and router stay f32)."
    ),
):
    """Write a synthetic Qwen3 checkpoint in exactly the on-disk format of released ones."""
    from qwen3dbg.model.synth import PRESETS, Plants, make_model

    if list_presets:
        for name, p in PRESETS.items():
            typer.echo(f"{name:20s} {p.about}")
        return
    if out is None:
        raise UserError("make-model needs the output path: qwen3dbg make-model DIR --preset ... (see --list-presets)")
    if format == "gguf" and out.is_dir():
        raise UserError(f"--format gguf writes one file, and {out} is a directory: name the .gguf file")
    _writable_dir(out.parent if format == "gguf" else out)  # write_gguf makes missing folders
    plants = Plants(
        k_norm_peak=k_norm_peak,
        q_norm_peak=q_norm_peak,
        ghost_bias=ghost_bias,
        nonfinite=tuple(nonfinite),
        huge=tuple(huge),
    )
    with progress_bar("make-model") as bar:
        task = bar.add_task(f"writing {preset}")

        def track(names, total):
            bar.update(task, total=total)
            for n in names:
                yield n
                bar.advance(task)

        options = dict(seed=seed, dtype=dtype, shard_bytes=shard_size_mb * 1024**2, plants=plants, progress=track)
        if format == "safetensors":
            make_model(out, preset, **options, replace=replace)
        elif format == "gguf":
            from qwen3dbg.model.gguf_io import make_gguf_model

            make_gguf_model(
                out,
                preset,
                gguf_type,
                **options,
                converting=lambda: bar.update(task, description=f"converting to GGUF {gguf_type}", completed=0),
            )
        else:
            raise UserError(f"unknown --format {format!r}: use safetensors or gguf")
    say(f"wrote {preset} to {out}")


@app.command()
def capture(
    impl: str = typer.Option(
        "hf",
        help="Implementation to run: hf, scratch (the readable reference), mine, a bug "
        "of the catalogue, with NAME:key=value options (mine:rmsnorm=fused), or "
        "module:FILE.py:factory (docs/ports.md), litgpt, llamacpp:MODEL.gguf.",
    ),
    model: Model = None,
    token_ids: TokenIds = None,
    prompt: Prompt = None,
    decode_ids: DecodeIds = None,
    decode_steps: DecodeSteps = None,
    dtype: Dtype = "bfloat16",
    attn: Optional[str] = typer.Option(
        None,
        help="hf only: eager (the default: scores and probabilities captured) or sdpa; the same as --impl hf:attn=...",
    ),
    taps: list[str] = typer.Option([], help="Glob of tap names to keep, e.g. 'layers.*.attn_*' (repeatable)."),
    out: Path = typer.Option(
        ..., help="Directory of the tap store to write: new or empty, or holding a store that --replace overwrites."
    ),
    replace: bool = typer.Option(
        False,
        "--replace",
        help="Overwrite the tap store in --out (it reads as incomplete until the new one is written).",
    ),
    verbose: Verbose = False,
):
    """Run one implementation on fixed token ids and write every tap into a tap store."""
    from qwen3dbg.run.inputs import RunInputs
    from qwen3dbg.run.registry import with_attn
    from qwen3dbg.run.sides import parse_side

    inputs = RunInputs.from_flags(token_ids, prompt, decode_ids, decode_steps)
    spec = parse_side(impl, "impl")
    if spec.store_paths:
        raise UserError(f"--impl {impl} is a tap store: capture runs an implementation")
    spec = with_attn(spec, attn)
    _check_model_flag(model)
    _writable_dir(out)

    from qwen3dbg.diff.golden import pick_steps
    from qwen3dbg.run.capture import capture as run_capture
    from qwen3dbg.run.capture import estimate_bytes, planned
    from qwen3dbg.run.plan import plan_run, with_greedy_ids
    from qwen3dbg.tapstore.store import check_out_dir
    from qwen3dbg.util.dtypes import dtype_name
    from qwen3dbg.util.progress import Phases
    from qwen3dbg.util.third_party import set_verbose

    set_verbose(verbose)
    check_out_dir(out, replace)  # before the run; the writer asks again under its lock
    with Phases(console, "capture") as shown:
        shown.status("reading the model")
        plan = plan_run([spec], model, inputs, dtype)
        if plan.greedy:
            shown.status(f"picking {plural(plan.greedy, 'decode token')} greedily with the fp64 golden")
            plan = with_greedy_ids(plan, pick_steps(plan.model, plan.steps[0].token_ids[0], plan.greedy))
        steps = plan.steps
        shown.status(f"loading {impl}")
        cand = plan.load("impl")
        loaded = {"weights_digest": plan.model.checkpoint.digest()} if cand.reads_model_weights else {}
        plans = planned(cand, steps, taps or None)
        total = sum(map(len, plans))
        say(
            f"capturing {impl} in {dtype_name(cand.dtype)}: {steps[0].tokens} prompt tokens + "
            f"{plural(len(steps) - 1, 'decode step')}, {total} taps, "
            f"about {estimate_bytes(cand, plans) / 1e6:.1f} MB into {out}"
        )
        shown.status("capturing")
        written = iter(range(1, total + 1))
        run_capture(
            cand,
            steps,
            out,
            patterns=taps or None,
            tick=lambda: shown.count(next(written), total, "taps written"),
            extra=loaded,
            replace=replace,
        )
    say(f"wrote tap store {out}")


@app.command("validate-store")
def validate_store_cmd(
    stores: list[Path] = typer.Argument(
        ...,
        help="Tap store directory (manifest.json + step_NNNN.safetensors), or the stores of every rank of one "
        "tensor-parallel run.",
    ),
    model: Optional[Path] = typer.Option(
        None,
        help="Model directory whose config the shapes must match (default: the config the manifest carries, if any).",
    ),
):
    """Check a tap store written by any program: names, shapes, dtypes, steps, token ids, files; given the
    stores of a tensor-parallel run's ranks, each alone and all together. Exit 0 valid, 1 problems found,
    2 unreadable."""
    from qwen3dbg.model.model_dir import open_model
    from qwen3dbg.tapstore.validate import validate_ranks, validate_store

    # the model is loaded as every command loads it: a config declaring 10^9 layers is refused by what
    # the weights hold before any list of taps is made
    config = open_model(model).config if model else None
    problems = validate_store(stores[0], config) if len(stores) == 1 else validate_ranks(stores, config)
    store = " ".join(map(str, stores))
    shown = 20
    for p in problems[:shown]:
        say(("problem", "red"), f" {p}")
    if len(problems) > shown:
        say(f"... and {len(problems) - shown} more")
    if problems:
        say(f"{store}: {len(problems)} problem(s)")
        raise typer.Exit(1)
    say(f"{store}: valid tap store" + (f"s of {len(stores)} ranks" if len(stores) > 1 else ""))


@app.command("cache")
def cache_cmd(
    clear: bool = typer.Option(False, "--clear", help="Remove everything listed."),
):
    """List what qwen3dbg keeps under $QWEN3DBG_HOME (default models, compiled kernels, runs older versions
    left), least recently used first, or clear it. It stays within QWEN3DBG_CACHE_BUDGET (default 10GB):
    when an entry is added, the least recently used go."""
    import time

    from rich.table import Table

    from qwen3dbg.util.home import budget, home, listing
    from qwen3dbg.util.home import clear as clear_all

    found = clear_all() if clear else listing()
    table = Table(title=f"{'removed from' if clear else 'cached in'} {home()}", title_justify="left")
    for col in ("kind", "size", "last used", "path"):
        table.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
    now = time.time()
    for e in found:
        table.add_row(e.kind, f"{e.size / 1e6:,.1f} MB", f"{(now - e.last_used) / 3600:,.1f} h ago", e.path.name)
    report_console().print(table, markup=False)
    total = sum(e.size for e in found)
    report_console().print(
        f"{len(found)} entries, {total / 1e9:.2f} GB; budget {budget() / 1e9:.2f} GB (QWEN3DBG_CACHE_BUDGET)",
        markup=False,
        highlight=False,
    )


@app.command()
def diff(
    ref: str = typer.Option(
        "hf",
        help="Reference: an implementation name (hf, scratch), NAME:key=value options "
        "(hf:attn=sdpa), or store:DIR for a tap store on disk.",
    ),
    cand: str = typer.Option(
        ...,
        help="Candidate: an implementation name (mine, ...) with NAME:key=value options "
        "(mine:rmsnorm=fused), a bug of the catalogue, module:FILE.py:factory (a "
        "PyTorch port, docs/ports.md), litgpt (litgpt's own Qwen3), "
        "llamacpp:MODEL.gguf, or store:DIR (an external engine's taps; "
        "the other sides run on its token ids).",
    ),
    model: Model = None,
    token_ids: TokenIds = None,
    prompt: Prompt = None,
    decode_ids: DecodeIds = None,
    decode_steps: DecodeSteps = None,
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP + " Default: a store's own dtype, else bfloat16."),
    json_out: JsonOut = None,
    html_out: HtmlOut = None,
    verbose: Verbose = False,
):
    """Find the first op where a candidate parts from the reference, judged against an fp64 golden.

    Exit status: 0 no divergence, 1 divergence found, 2 bad input or a failure."""
    from qwen3dbg.run.inputs import RunInputs
    from qwen3dbg.run.sides import parse_side

    inputs = RunInputs.from_flags(token_ids, prompt, decode_ids, decode_steps)
    sides = [parse_side(ref, "ref"), parse_side(cand, "cand")]
    _check_model_flag(model)
    _writable_files(json_out, html_out)

    from qwen3dbg.diff import diff_plan
    from qwen3dbg.reports.terminal import render
    from qwen3dbg.run.plan import plan_run
    from qwen3dbg.util.progress import Phases
    from qwen3dbg.util.third_party import set_verbose

    set_verbose(verbose)
    try:
        with Phases(console, "diff") as shown:
            shown.status("resolving the run: model, sides, ids")
            plan = plan_run(sides, model, inputs, dtype)
            result = diff_plan(plan, status=shown.status, progress=shown.progress)
    except UserError:
        raise
    except Exception:  # a crash must not read as exit 1, "divergence found"
        console.print_exception()
        raise typer.Exit(2)
    render(result, report_console())
    from qwen3dbg.reports.diff_html import render_html
    from qwen3dbg.reports.diff_json import render_json

    with Phases(console, "diff") as shown:  # a 2048-token run's JSON takes seconds to write
        _write_outputs(result, {json_out: render_json, html_out: render_html}, shown.status)
    raise typer.Exit(result.exit_code)


def _check_model_flag(model: Optional[Path]) -> None:
    """--model refused before torch is imported: a missing directory costs no second of imports."""
    from qwen3dbg.model.model_dir import check_model_path

    if model is not None:
        check_model_path(model)


def _fail_on(value: str) -> str:
    if value not in ("warning", "error"):
        raise UserError(f"--fail-on {value!r}: use warning or error")
    return value


def _writable_dir(path: Path) -> None:
    """Refuse an output directory that cannot be made or written into, before the work that fills it
    (probing its nearest existing folder, so a command that then fails leaves no empty directory)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot write into {path}: {existing} is a file, not a directory")
    try:
        tempfile.NamedTemporaryFile(dir=existing).close()
    except OSError as e:
        raise UserError(f"cannot write into {path}: {e.strerror}") from None


def _writable_files(*paths: Optional[Path]) -> None:
    """Refuse output files that cannot be written before the work whose result they would hold."""
    given = [p for p in paths if p is not None]
    if len({p.resolve() for p in given}) < len(given):
        raise UserError(f"--json and --html both name {given[0]}: give each its own file")
    for path in given:
        if str(path) == "-":
            raise UserError("'-' is not an output file: give a file path (the report itself goes to the terminal)")
        existed = os.path.lexists(path)  # a dangling symlink exists: opening it would create its target
        try:
            path.open("a").close()
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror}") from None
        if not existed:
            path.unlink()


def _write_outputs(
    result, views: dict[Optional[Path], Callable[[object], str]], status: Callable[[str], None] = lambda msg: None
) -> None:
    """Write each requested view of `result` (path -> renderer), saying `status` before each; a path that
    cannot be written is a UserError."""
    from qwen3dbg.util.text import utf8_text

    for path, view in views.items():
        if path is not None:
            status(f"writing {path}")
            try:
                path.write_text(utf8_text(view(result)), encoding="utf-8")
            except OSError as e:
                raise UserError(f"cannot write {path}: {e.strerror}") from None
            say(f"wrote {path}")


def _progress_task(bar, label: str):
    """A `progress(total)` callback for the library: adds a task and returns its `advance(n)`."""

    def progress(total):
        task = bar.add_task(label, total=total)
        return lambda n: bar.advance(task, n)

    return progress


@app.command("scan-checkpoint")
def scan_checkpoint_cmd(
    path: Path = typer.Argument(
        ..., help="Model directory (config.json + safetensors), a .safetensors or a .gguf file."
    ),
    json_out: JsonOut = None,
    html_out: HtmlOut = None,
    fail_on: FailOn = "error",
    threshold: float = typer.Option(
        20.0,
        min=0,
        help="Warn about norm weights (q_norm, k_norm, ...) whose |value| exceeds this; a q_norm/k_norm weight of "
        "256 or more is an error whatever this is (docs/bad-input.md).",
    ),
    huge: float = typer.Option(
        1e4, min=0, help="Flag tensors with |values| at or above this (trained weights stay far below)."
    ),
):
    """Lint a checkpoint: container integrity, tensors against the config, values, and numerically dangerous norms.

    Exit 0 clean, 1 findings at or above --fail-on, 2 when PATH is not a checkpoint at all."""
    from qwen3dbg.reports.scan_html import scan_html
    from qwen3dbg.reports.scan_json import render_json
    from qwen3dbg.reports.scan_terminal import print_scan
    from qwen3dbg.scan.checks import Thresholds
    from qwen3dbg.scan.scan import scan_checkpoint

    fail_on = _fail_on(fail_on)
    _writable_files(json_out, html_out)
    with progress_bar("scan-checkpoint") as bar:
        result = scan_checkpoint(
            path, Thresholds(norm=threshold, huge=huge), _progress_task(bar, "scanning (bytes)"), fail_on
        )
    print_scan(result, report_console())
    _write_outputs(result, {json_out: render_json, html_out: scan_html})
    raise typer.Exit(result.exit_code)


@app.command("diff-weights")
def diff_weights_cmd(
    a: Path = typer.Argument(..., help="Checkpoint A: model directory, .safetensors or .gguf."),
    b: Path = typer.Argument(..., help="Checkpoint B, e.g. A's GGUF conversion."),
    json_out: JsonOut = None,
    html_out: HtmlOut = None,
    fail_on: FailOn = "error",
):
    """Compare two checkpoints tensor by tensor in HF names: missing, reshaped, permuted and changed tensors.

    Differences within the two formats' rounding are not findings. Exit 0 clean, 1 differences, 2 unreadable."""
    from qwen3dbg.reports.scan_html import weights_diff_html
    from qwen3dbg.reports.scan_json import render_json
    from qwen3dbg.reports.scan_terminal import print_weights_diff
    from qwen3dbg.scan.diff import diff_weights

    fail_on = _fail_on(fail_on)
    _writable_files(json_out, html_out)
    with progress_bar("diff-weights") as bar:
        result = diff_weights(a, b, _progress_task(bar, "comparing (tensors)"), fail_on)
    print_weights_diff(result, report_console())
    _write_outputs(result, {json_out: render_json, html_out: weights_diff_html})
    raise typer.Exit(result.exit_code)


@app.command()
def selftest(
    device: str = typer.Option(
        "cuda",
        help="Where mine runs: cuda (checked against its CPU twin and HF), emulated "
        "(the CUDA kernels run on the CPU by an emulator and checked against the twin: no GPU "
        "needed, slow, for tiny models; no speed table) or cpu.",
    ),
    model: Model = None,
    dtype: Dtype = "bfloat16",
    prompt_tokens: int = typer.Option(128, help="Prompt length of the prefill timing."),
    decode_steps: int = typer.Option(64, help="Decode steps of the decode timing."),
    json_out: JsonOut = None,
):
    """Check the mine engine on a GPU: tap by tap against its CPU twin and HF eager, then tokens/s next to HF.

    Exits 1 if a tap's bits differ from the CPU twin's, a capture to a tap store does not read back
    exactly (on a GPU the store copies taps asynchronously), or capture off (on a GPU, decode by CUDA
    graph) gives other logits than capture on; else 0."""
    from qwen3dbg.candidates.mine.selftest import selftest as run_selftest
    from qwen3dbg.reports.selftest_json import render_json
    from qwen3dbg.reports.selftest_terminal import render
    from qwen3dbg.model.model_dir import open_model

    if prompt_tokens < 1 or decode_steps < 1:
        raise UserError("--prompt-tokens and --decode-steps must be at least 1")
    _writable_files(json_out)
    result = run_selftest(
        open_model(model).path, device, dtype, prompt_tokens, decode_steps, progress=lambda what: say((what, "dim"))
    )
    render(result, report_console())
    _write_outputs(result, {json_out: render_json})
    raise typer.Exit(result.exit_code)


def main() -> None:
    import sys

    for stream in (sys.stdout, sys.stderr):  # a lone surrogate (a non-UTF-8 file name) prints as \udcff
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        app()
    except UserError as e:
        say(("error:", "red"), f" {e}")
        raise SystemExit(2)
