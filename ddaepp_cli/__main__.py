"""`python -m ddaepp_cli` is the `ddaepp` command (so `accelerate launch -m ddaepp_cli train …` works)."""

from .cli import main

if __name__ == "__main__":
    main()
