"""Prepare a dataset for training: `python prepare.py shakespeare_char` (see flaxgpt/prepare.py)."""

from flaxgpt.prepare import main

if __name__ == "__main__":
    main()
