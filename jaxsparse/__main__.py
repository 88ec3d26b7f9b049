"""``python -m jaxsparse``: compare pruning methods on the embedded digits."""

from jaxsparse.experiments.cli import main

if __name__ == "__main__":
    main()
