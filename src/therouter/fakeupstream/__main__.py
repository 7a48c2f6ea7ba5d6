"""``python -m therouter.fakeupstream`` runs the fake upstream server."""

from therouter.fakeupstream.cli import main

raise SystemExit(main())
