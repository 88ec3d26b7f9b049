"""The command-line experiment runner (``python -m jaxsparse``)."""
