from infinilm_nb.cli import main

raise SystemExit(main())
