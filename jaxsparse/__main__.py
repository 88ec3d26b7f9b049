"""``python -m jaxsparse``: compare pruning methods on the embedded digits."""

from jaxsparse.experiments.runner import main

if __name__ == "__main__":
    main()
