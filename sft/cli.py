"""`patho-r1 cpt CONFIG` and `patho-r1 sft CONFIG`: aliases of `patho-r1 phase cpt|sft CONFIG` (one supervised phase
alone, `--resume` from its newest intermediate checkpoint, `--dry-run` to check the config and its data)."""

from __future__ import annotations


def register(sub, add_phase_command) -> None:
    """`add_phase_command(sub, command, phase_type)`: the launcher's standalone phase command (launch/cli.py), handed
    down because a phase package may not import the phase table."""
    for phase in ("cpt", "sft"):
        add_phase_command(sub, phase, phase)
