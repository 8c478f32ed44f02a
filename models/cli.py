"""The library's CLI over this Flax zoo: ``python -m models.cli`` (the ``liftcam-jax`` console
script finds the same zoo through the ``liftcam_jax.zoos`` entry point in pyproject.toml)."""
import sys


def main(argv=None) -> int:
    import models
    from liftcam_jax.cli import main as cli_main

    return cli_main(argv, zoo=models)


if __name__ == "__main__":
    sys.exit(main())
