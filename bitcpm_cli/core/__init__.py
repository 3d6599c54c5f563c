"""The bitcpm library: no CLI concerns here (no typer, no printing, no exiting)."""
