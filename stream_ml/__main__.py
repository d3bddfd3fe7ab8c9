from stream_ml.cli import main

raise SystemExit(main())
