"""``toolgrad-edge cache``: what the caches hold, and removing it (toolgrad_edge.caches)."""

from __future__ import annotations

import json

import click

from .options import json_option


@click.command()
@click.argument("what", nargs=-1)
@click.option("--clean", is_flag=True, help="Remove what WHAT names (WHAT is then required; `all` for everything).")
@click.option("--dry-run", is_flag=True, help="With --clean: say what would be removed, remove nothing.")
@json_option
def cache(what, clean, dry_run, as_json):
    """List what the caches hold, with sizes; remove it with --clean.

    WHAT picks a section (models, prefix, llguidance, llama-server, bfcl-env,
    leftovers), an item by its file name or path, or `all`; without WHAT,
    everything is listed. Leftovers are temporary files of runs that were
    killed (SIGKILL, out of memory, power cut); the next run of the same
    command removes them too. A file whose writer still runs is listed and
    never removed. Everything lives under $TOOLGRAD_EDGE_CACHE (default
    ~/.cache/toolgrad-edge).

    \b
    Examples:
      toolgrad-edge cache
      toolgrad-edge cache leftovers --clean
      toolgrad-edge cache prefix llguidance --clean --dry-run
      toolgrad-edge cache toolgrad-4b-BF16.gguf --clean
      toolgrad-edge cache all --clean --json
    """
    from ..caches import clean as remove_items
    from ..caches import inventory, select
    from ..leftovers import human_bytes
    from ..paths import cache_root

    if dry_run and not clean:
        raise click.UsageError("--dry-run goes with --clean.")
    if clean and not what:
        raise click.UsageError("--clean removes what WHAT names: a section, an item, or `all` "
                               "(see `toolgrad-edge cache` for the list).")
    try:
        items = select(inventory(), list(what))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    removed = [] if not clean else ([i for i in items if not i.kept] if dry_run else remove_items(items))
    if as_json:
        payload = {"root": str(cache_root()), "items": [i.to_dict() for i in items],
                   "bytes": sum(i.size for i in items)}
        if clean:
            payload.update(dry_run=dry_run, removed=[str(i.path) for i in removed],
                           freed_bytes=sum(i.size for i in removed))
        click.echo(json.dumps(payload, indent=2))
        return
    if not items:
        click.echo(f"Nothing cached in {cache_root()}." if not what else "Nothing matches.", err=True)
        return
    verb = "would remove" if dry_run else "removed"
    section = None
    for item in items:
        if item.section != section:
            section = item.section
            click.echo(click.style(f"{section}:", bold=True))
        mark = ""
        if clean:
            mark = f"  [{verb}]" if item in removed else f"  [kept: {item.kept}]"
        note = f"  ({item.note})" if item.note and not (clean and item.note == item.kept) else ""
        click.echo(f"  {human_bytes(item.size):>9}  {item.path}{note}{mark}")
    total = sum(i.size for i in items)
    if clean:
        click.echo(f"{verb} {len(removed)} of {len(items)} items, {human_bytes(sum(i.size for i in removed))}.")
    else:
        click.echo(f"{len(items)} items, {human_bytes(total)} in {cache_root()}.")
