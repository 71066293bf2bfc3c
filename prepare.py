"""Prepare a dataset for training: `python prepare.py shakespeare_char`, `... fineweb_edu`,
`... text --input 'DIR/*.jsonl' --name NAME` (see flaxgpt/prepare/__init__.py)."""

from flaxgpt.prepare import main

if __name__ == "__main__":
    main()
