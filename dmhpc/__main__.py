from dmhpc.cli import main

raise SystemExit(main())
