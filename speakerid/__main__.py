"""python -m speakerid …, and accelerate launch -m speakerid train …: the ``speakerid`` command (speakerid.cli)."""

from speakerid.cli import main

if __name__ == "__main__":
    main()
