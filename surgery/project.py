"""Where this project lives and how a stranger installs it: one constant each, used by the model
cards, ``hubconf.py`` and the README (``tests/test_install.py`` checks ``pyproject.toml`` agrees).

The package is not on PyPI: it installs from its Git repository. :data:`REPOSITORY` is the GitHub
``owner/name`` the project is published under (the same name as its Hugging Face organisation);
change it here, and only here, if the project moves.

Example:
    >>> from surgery.project import INSTALL_COMMAND
    >>> INSTALL_COMMAND
    'pip install "compressed-cnn-surgery @ git+https://github.com/compressed-cnn-surgery/compressed-cnn-surgery"'
"""

DISTRIBUTION = "compressed-cnn-surgery"  # the name pip knows the package by (pyproject.toml)
REPOSITORY = "compressed-cnn-surgery/compressed-cnn-surgery"  # GitHub owner/name; torch.hub.load takes it
PROJECT_URL = f"https://github.com/{REPOSITORY}"
INSTALL_COMMAND = f'pip install "{DISTRIBUTION} @ git+{PROJECT_URL}"'
