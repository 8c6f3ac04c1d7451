"""``python -m lens_safety`` runs the command line (same as ``lens-safety``)."""

from lens_safety.cli import main

main()
