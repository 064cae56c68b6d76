"""`python -m proxy` is the container's entrypoint, so it must behave exactly like the console script."""

from proxy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
