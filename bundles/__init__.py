"""MONAI bundles of deepsim, installed as the data package ``deepsim.bundles`` (see pyproject.toml)."""
