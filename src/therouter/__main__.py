from therouter.cli import main

raise SystemExit(main())
