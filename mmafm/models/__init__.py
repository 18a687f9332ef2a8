"""Model families, one file each; every file registers its presets with :mod:`mmafm.registry`."""
