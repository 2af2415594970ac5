"""`python -m ddaepp_cli` is the `ddaepp` command (so `accelerate launch -m ddaepp_cli train …` works)."""

from .cli import app

if __name__ == "__main__":
    app(prog_name="ddaepp")
