"""Transitional entry point: ``python -m flare._runner`` for workers that still start the
runner under its old name. The runner lives in ``flare._runtime`` (``python -m
flare._runtime``); remove this module once every worker starts that."""

if __name__ == "__main__":
    import sys

    from flare._runtime.runner import main

    sys.exit(main())
