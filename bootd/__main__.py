from bootd.cli.main import main

raise SystemExit(main())
