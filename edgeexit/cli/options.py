"""Shared pieces of the command line's option handling: did-you-mean suggestions and a Choice that makes them."""

from __future__ import annotations

import difflib
from typing import Any, Iterable

import click


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the candidate nearest to ``word`` (difflib), or ``""`` when none is near."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class Choice(click.Choice):
    """click.Choice whose refusal lists the choices and suggests the nearest one."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            choices = [str(c) for c in self.choices]
            self.fail(f"{value!r} is not one of {', '.join(choices)}{did_you_mean(str(value), choices)}", param, ctx)


__all__ = ["Choice", "did_you_mean"]
