"""``edgeexit compare``: several ``edgeexit bench`` results of one bundle side by side (table, CSV, plot)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UsageError
from ..runtime.atomic import write_file_atomic


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/compare", show_default=True,
              help="Directory for <name>.csv and <name>.png.")
@click.option("--name", default="compare", show_default=True, help="File name stem of the CSV and the plot.")
@click.option("--allow-mixed", is_flag=True, help="Compare results of different bundles (by bundle hash) anyway.")
@click.option("--no-plot", is_flag=True, help="Do not draw the PNG plot.")
def compare(results: tuple[str, ...], out_dir: str, name: str, allow_mixed: bool, no_plot: bool) -> None:
    """Compare bench RESULTS (JSON files, e.g. one per board) of the same bundle: accuracy, latency and energy per
    input against each board's monolithic model."""
    from ..bench.compare import comparison_csv, comparison_rows, format_comparison, load_results, plot_comparison
    from ..bench.plot import PlotUnavailable

    rows = comparison_rows(load_results(results, allow_mixed=allow_mixed))
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_file_atomic(out / f"{name}.csv", comparison_csv(rows))
    except OSError as exc:
        raise UsageError(f"cannot write into {out} ({exc.strerror}); pass a writable --out") from None
    click.echo(format_comparison(rows))
    written = [str(out / f"{name}.csv")]
    if not no_plot:
        try:
            written.append(str(plot_comparison(rows, out / f"{name}.png")))
        except PlotUnavailable as exc:
            click.echo(f"plot skipped: {exc}", err=True)
    click.echo(f"wrote {', '.join(written)}", err=True)
