"""``python -m lens_safety.arch_matrix PAGE.md [ARCH ...]`` (see :func:`lens_safety.arch_matrix.main`)."""

from lens_safety.arch_matrix import main

main()
