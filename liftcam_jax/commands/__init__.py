"""Subcommands of the liftcam-jax CLI: each module has add_arguments(parser) and run(args, zoo)."""
