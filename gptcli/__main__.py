"""`python -m gptcli ...` (what `gptcli train --nproc N` hands to torchrun)."""

from gptcli.cli import main

main()
