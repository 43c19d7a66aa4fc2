"""`dsc matrix`: models x precisions x profiles, with shared stages (docs/MATRIX.md)."""
