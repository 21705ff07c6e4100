"""Hugging Face Space entry point: ``python app.py [--zoo DIR] [--hub-org ORG] ...`` (see space/app.py)."""

from space.app import main

if __name__ == "__main__":
    main()
