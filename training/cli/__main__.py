"""``python -m training.cli``: the same app as the ``reid-train`` console script."""

from training.cli import main

# Guarded because tests import every training module (pkgutil.walk_packages), this one included.
if __name__ == "__main__":
    main()
