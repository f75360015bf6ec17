"""The ``posenc`` command line: thin; parses, calls the library, prints with rich."""

from __future__ import annotations

import dataclasses

import typer
from rich.console import Console
from rich.table import Table

import posenc

app = typer.Typer(help="posenc: a positional-encoding laboratory for PyTorch.", no_args_is_help=True)
console = Console()


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(field.default_factory())  # type: ignore[misc]
    return "(required)"


@app.command("list")
def list_encodings() -> None:
    """A table of every registered encoding: name, family, parameters, paper."""
    table = Table(title="posenc encodings")
    for col in ("name", "family", "parameters", "reference"):
        table.add_column(col, overflow="fold")
    for name in posenc.available():
        cls = posenc.get(name)
        params = ", ".join(f.name for f in dataclasses.fields(cls.Params)) or "-"
        table.add_row(name, cls.family, params, cls.reference)
    console.print(table)


@app.command("show")
def show(name: str = typer.Argument(..., help="a registered encoding name")) -> None:
    """Parameters with defaults, formula, flaw and reference of one encoding."""
    try:
        cls = posenc.get(name)
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(f"[bold]{name}[/bold] ({cls.family})")
    console.print(f"formula:   {cls.formula}")
    if cls.flaw:
        console.print(f"flaw:      {cls.flaw}")
    console.print(f"reference: {cls.reference}")
    table = Table(title="parameters")
    table.add_column("name")
    table.add_column("default")
    table.add_column("type")
    for f in dataclasses.fields(cls.Params):
        table.add_row(f.name, _default(f), str(f.type))
    console.print(table)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
