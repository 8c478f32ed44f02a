"""The ``liftcam-jax`` console script: the library's CLI over this Flax zoo."""
import sys


def main(argv=None) -> int:
    import models
    from liftcam_jax.cli import main as cli_main

    return cli_main(argv, zoo=models)


if __name__ == "__main__":
    sys.exit(main())
