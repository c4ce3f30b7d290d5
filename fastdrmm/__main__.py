import sys

from ._interrupt import install

install()  # before the command line's modules load (see fastdrmm._interrupt)

from .cli import main  # noqa: E402

sys.exit(main())
