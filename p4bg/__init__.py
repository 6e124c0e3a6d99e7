"""p4bg: Boltzmann generators with P4Inv layers (invertible linear layers trained through
rank-one perturbations). See DESIGN.md for the map of the package."""

__version__ = "0.1.0"
