import sys

if sys.argv[1:2] == ["--pushdown"]:  # the collect[] push-down row alone: benchmarks/pushdown.py
    from benchmarks.pushdown import main as pushdown_main

    raise SystemExit(pushdown_main(sys.argv[2:]))

from benchmarks.cli import main

raise SystemExit(main())
