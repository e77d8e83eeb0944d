"""`python -m rscurate` runs the command line."""

from rscurate.cli import main

if __name__ == "__main__":
    main()
