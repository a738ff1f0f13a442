"""How the command line's help reads where typer's own rendering says less than it should."""

from __future__ import annotations

import typer


def bare_flags_in_help() -> None:
    """Help shows a flag (--help, --list-presets) bare: it takes no value, so no `<bool>` beside it.
    Patches typer's option class, once however often it is called."""
    option = typer.core.TyperOption
    display = option.display_type_rich
    if getattr(display, "bare_flags", False):
        return

    def shown(self, ctx):
        return None if self.is_flag else display(self, ctx)

    shown.bare_flags = True
    option.display_type_rich = shown
